"""Command lines for evaluation and inference (eval/*.py are thin wrappers around these)."""
