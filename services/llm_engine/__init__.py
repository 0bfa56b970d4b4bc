"""The gRPC inference engine: owns the model, the tokenizer and the scheduler thread."""
