"""A trained head on new images: the tagger (CLIP + head, labels embedded on demand), its page."""
