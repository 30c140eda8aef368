"""Training gated adapters: the R-ISD objective, the trainer, and PEFT-format output."""
