"""Strength sweeps (:mod:`.runner`) and where a hemorrhage curve turns into collapse (:mod:`.threshold`)."""
