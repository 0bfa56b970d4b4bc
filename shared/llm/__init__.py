"""llm: a PyTorch LLM library (models, data, training, inference) behind the trainer and the engine."""

__version__ = "0.1.0"
