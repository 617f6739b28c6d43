"""Stage one, once per image: the frozen CLIP backbone, the training views, extraction into a
feature store (in this process or on a dask cluster) and the label vocabulary's embeddings."""
