"""Where stage one's output lives.

The feature store, the label store, their fingerprints, the shard reader, locations (a directory or
an fsspec URL) and HDF5 interchange.
"""
