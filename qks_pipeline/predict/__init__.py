"""Using a trained head on new images: the tagger (CLIP + head, labels embedded on demand) and its
HTML page."""
