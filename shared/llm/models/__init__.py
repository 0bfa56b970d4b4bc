from llm.models.decoder import DecoderModel

__all__ = ["DecoderModel"]
