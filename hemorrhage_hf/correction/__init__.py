"""The decoding-time mitigation: a ``LogitsProcessor`` fitted to pull a modified model's next-token distribution back
to the reference's (:mod:`.processor`), its pure tensor functions (:mod:`.ops`), the opt-in state network
(:mod:`.network`) and the reference's own samples as more fit text (:mod:`.reference_samples`)."""
