"""The model: which files make a checkpoint, how it is loaded and sized, and one request through it."""
