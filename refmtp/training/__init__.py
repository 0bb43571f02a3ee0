"""Training: the one training step, AdamW and its schedule, the byte corpus, the trainer and
its run directory."""
