"""Conversions between `DecoderModel` and other ecosystems' checkpoints (Hugging Face)."""
