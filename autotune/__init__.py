"""The hardware-aware tuner for microtile: ``python -m autotune``."""
