"""Datasets: manifests (which image has which labels), importers of published datasets, images."""
