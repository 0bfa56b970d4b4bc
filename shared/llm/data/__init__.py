"""Data: tokenizers, corpus sources and datasets."""
