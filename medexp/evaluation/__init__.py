"""Evaluation: segmentation metrics (MONAI where it has them), lesion-wise metrics and object counting,
inference over a loader, and per-case tables."""
