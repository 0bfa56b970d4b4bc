"""The trainer job: `llm-train` (plain, under torchrun, or as a PyTorchJob)."""
