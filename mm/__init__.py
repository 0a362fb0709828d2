"""mm: one WebDataset data layer and one DeepSpeed engine for multimodal trainers."""

__version__ = "0.1.0"
