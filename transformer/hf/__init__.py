"""Hugging Face checkpoint conversion, one module per model family (kept out of the model files)."""
