"""medexp: a config-driven experiment runner for 2D and 3D medical image segmentation."""

__version__ = "0.1.0"
