"""Models: open_clip towers, frozen multi-layer encoders, the knowledge-enhanced encoder, SAM + LoRA."""
