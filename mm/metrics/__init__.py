"""Evaluation metrics: zero-shot classification/retrieval and binary segmentation."""
