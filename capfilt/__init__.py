"""capfilt: BLIP's CapFilt (caption and filter) over web-scale image-text datasets."""

__version__ = "0.1.0"
