"""Offline datasets and tokenizers for the reference training runs: nothing here downloads."""
