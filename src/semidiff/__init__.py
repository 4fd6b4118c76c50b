"""semidiff: semi-supervised medical image segmentation with diffusion models."""

__version__ = "0.1.0"
