"""Datasets, splits and loaders. A dataset object yields case dicts {"id", "image", "label"} of files on
disk plus a DatasetInfo; loaders.py turns them into MONAI datasets for a split."""
