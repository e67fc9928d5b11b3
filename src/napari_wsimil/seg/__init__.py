"""Pixel-resolution segmentation from weak and mixed labels."""
