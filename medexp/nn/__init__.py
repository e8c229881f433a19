"""Layers and networks. Every module here takes plain keyword arguments (no DictConfig)."""
