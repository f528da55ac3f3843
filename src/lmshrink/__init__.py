"""lmshrink: compress decoder language models by truncation, healing and distillation, and measure what was lost."""

__version__ = "0.1.0"
