"""kdfine: knowledge distillation and FINE noisy-label detection for image classifiers."""

__version__ = "0.1.0"
