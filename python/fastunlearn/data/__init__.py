"""Data in and out: image files and datasets, forget-set selection, streaming sources, input checks, model files."""
