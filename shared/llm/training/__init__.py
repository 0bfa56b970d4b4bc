"""Training: optimizer and schedules, the training loop, checkpointing."""
