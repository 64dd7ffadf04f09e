"""Measurement: one streaming pass of the reference and the modified model over identical token windows, reduced to
per-token figures (:mod:`.engine`, pure tensor math in :mod:`.divergence`), summarised with errors and a severity grade
(:mod:`.report`); the exact reference store (:mod:`.refstore`) and the top-k reference cache (:mod:`.refcache`) that
let one reference pass serve many modified models, data parallelism (:mod:`.distributed`) and decoding changes
(:mod:`.decoding`).
"""
