"""llmtrain: pretraining, fine-tuning and RLHF of a language model, end to end."""

__version__ = "0.1.0"
