"""s2clip: training-free open-vocabulary semantic segmentation with frozen CLIP + DINO + SAM."""

__version__ = "0.1.0"
