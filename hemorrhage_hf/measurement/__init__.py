"""Measurement: one streaming pass of the reference and the modified model over identical token windows, reduced to
per-token figures (:mod:`.engine`, pure tensor math in :mod:`.divergence`), summarised with errors and a severity grade
(:mod:`.report`); the reference cache for sweeps (:mod:`.refcache`), data parallelism (:mod:`.distributed`) and
decoding changes (:mod:`.decoding`).
"""
