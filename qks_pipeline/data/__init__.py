"""Datasets: manifests (which image has which labels), the importers of published datasets, image
decoding."""
