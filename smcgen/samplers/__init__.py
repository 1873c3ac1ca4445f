"""The SMC samplers: the per-cycle step (``step``) and what a run returns (``run``, ``outcome``),
driven over a model runner by the generic engine (``generic``, any transformers model, any
Proposal / Resampler), the native GPU engine (``native``, with ``native_select`` deciding whether a
request can run there) and standard speculative decoding (``speculative``)."""
