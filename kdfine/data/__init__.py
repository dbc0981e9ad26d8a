"""Data sources, label noise and on-device batching."""
