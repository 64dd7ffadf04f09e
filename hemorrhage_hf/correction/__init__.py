"""The decoding-time mitigation: a ``LogitsProcessor`` fitted to pull a modified model's next-token distribution back
to its reference's.

- :mod:`.processor`: :class:`~.processor.DecodingCorrection`, the processor (apply, save, load) and its fit summary;
- :mod:`.fit`: the fit, one step per function: plan the text by document into fit / select / report shares, collect
  both models' predictions, fit the families, judge on the report share;
- :mod:`.corrections`: the correction families, one small class each (tensors, identity, penalty, term);
- :mod:`.ops`: pure tensor functions of the fit (the state bias in closed form, the KL and its gradient);
- :mod:`.network`: the opt-in ``state_network`` family, trained on states;
- :mod:`.reference_samples`: the reference's own samples as more text for the network.
"""
