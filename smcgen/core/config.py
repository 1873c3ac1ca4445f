"""Run configuration for SMC decoding, validated by pydantic.

Two groups of settings: :class:`SamplingParams` say *what* is sampled (the algorithm: particles,
block size, temperatures, power, seed, resampling) and may change per request;
:class:`EngineSettings` say *how* it runs (which engine, draft quantization) and are fixed when an
:class:`~smcgen.engine.Engine` is built. :class:`SMCConfig` holds both, flat, so every keyword
argument users already pass (``generate(..., n_particles=16, engine="generic")``) keeps working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ResamplerName = Literal["systematic", "multinomial", "stratified", "residual"]
EngineName = Literal["auto", "native", "generic"]

# Bounds where the arithmetic stays finite. Logits are float32 (bf16 on the native engine; both top
# out at 3.4e38) and are scaled by 1/tau, then by alpha, and summed over a block: with |logit| <= 1e4
# (far above any trained model's, ~1e2), tau in [1e-4, 1e4] and alpha <= 1e4 every scaled value stays
# below 1e12, so no step overflows to inf or makes inf - inf = NaN. At tau = 1e-40 (accepted before)
# 1/tau is inf in float32 and the run returned a perfect-looking empty answer; at alpha = inf,
# inf * 0 is NaN.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
MAX_ALPHA = 1e4
# The CPU generator (mt19937) keeps only the low 32 bits of a seed: seeds 0 and 2**32 drew the same
# tokens. Seeds outside [0, 2**32) are refused instead of silently colliding.
MAX_SEED = 2**32 - 1
MethodName = Literal["smc", "sd"]
DraftQuantization = Literal["auto", "none", "int8", "fp8"]


class SamplingParams(BaseModel):
    """The algorithm's settings: what one request samples and how the particles evolve.

    Invalid values raise ``pydantic.ValidationError`` naming the field and the allowed range, e.g.
    ``n_particles: Input should be greater than or equal to 1``; unknown fields are rejected so a typo
    never passes silently, and NaN or infinite numbers are rejected as such. ``temperature=t`` is
    shorthand for ``target_temperature=t`` and ``draft_temperature=t`` where those are not given.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: MethodName = Field(
        "smc",
        description=(
            "'smc': sequential Monte Carlo (SMC speculative decoding with a draft). 'sd': standard speculative "
            "decoding (draft block_size tokens, keep each with prob min(1, p/q), residual draw on rejection): exact "
            "for the target p_tau, alpha=1 and no potentials only; n_particles rows are independent samples."
        ),
    )
    n_particles: int = Field(8, ge=1, le=65536, description="Particles N per request.")
    block_size: int = Field(
        4, ge=1, le=256, description="K: tokens the proposal drafts per step (the target adds a bonus token)."
    )
    block_size_policy: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description=(
            "'fixed': every step drafts block_size tokens. 'adaptive' (generic engine): block_size is the largest "
            "block; each step halves it when the last block's weights were uneven (ESS/N of the increments < 0.5) "
            "and doubles it when they were even (> 0.8), from past weights only, so the estimate stays unbiased."
        ),
    )
    max_new_tokens: int = Field(64, ge=1, description="Generation stops after this many new tokens.")
    ess_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Resample when ESS < ess_threshold * N; 0 never resamples, 1 resamples every step.",
    )
    resampler: ResamplerName = Field("systematic", description="Resampling scheme.")
    draft_temperature: float = Field(
        1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="Temperature of the draft proposal, in [1e-4, 1e4]."
    )
    target_temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Per-token temperature tau of the target, in [1e-4, 1e4]: p^(1/tau), renormalized per token.",
    )
    alpha: float = Field(
        1.0, gt=0.0, le=MAX_ALPHA, description="Sequence-level power, in (0, 1e4]: the target is p(x)^alpha."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed for every random draw, in [0, 2**32 - 1]; None draws a fresh seed.",
    )
    return_all_particles: bool = Field(
        False, description="Also decode the text of every particle into SMCResult.texts."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_temperature(cls, data: Any) -> Any:
        """``temperature`` (as in Hugging Face ``generate`` and the OpenAI API) sets both temperatures
        that are not given."""
        if isinstance(data, dict) and "temperature" in data:
            data = dict(data)
            t = data.pop("temperature")
            if t is not None:
                for field in ("target_temperature", "draft_temperature"):
                    if data.get(field) is None:  # not given, or given as None
                        data[field] = t
        return data

    @field_validator("target_temperature", "draft_temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, value: Any) -> Any:
        if isinstance(value, int | float) and value == 0:
            raise ValueError(
                f"temperature 0 is greedy decoding, which has no distribution to sample or weight: use a small "
                f"temperature such as 0.1 (at least {MIN_TEMPERATURE:g})"
            )
        return value


class EngineSettings(BaseModel):
    """How a request runs: the engine and the draft's weight format (fixed per built engine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineName = Field(
        "auto",
        description=(
            "Which engine runs: 'native' (paged KV, fused kernels, CUDA graphs; Llama/Qwen2/Qwen3 targets and "
            "drafts, no potentials, systematic resampling), 'generic' (any transformers model, any potential), "
            "or 'auto': native when the models are supported and on a GPU, generic otherwise."
        ),
    )
    draft_quantization: DraftQuantization = Field(
        "auto",
        description=(
            "Native engine, with a draft model: stream the draft's gate/up, down and LM head weights as one-byte "
            "values with one scale per weight row ('int8', or 'fp8' e4m3; activations stay bf16), or as loaded "
            "('none'). 'auto': int8 on a GPU when a draft step has at most 16 rows (particles x requests), where "
            "it streams faster (H100, Llama-8B/1B: N=8 K=8 +18%), as loaded otherwise (8 requests x 8 particles: "
            "-11%) and off the GPU. SMC stays exact: the weights use the quantized draft's own probabilities; what "
            "quantization costs is proposal quality, a lower ESS (SmolLM2 drafting for itself: int8 moved its "
            "next-token distributions ~7x less than fp8; BENCHMARKS.md). An explicit 'int8' / 'fp8' is rejected "
            "with engine='generic' and ignored when 'auto' falls back to the generic engine."
        ),
    )
    draft_fp8: bool = Field(False, description="Shorthand for draft_quantization='fp8' (kept for earlier callers).")

    @model_validator(mode="after")
    def _one_draft_format(self) -> EngineSettings:
        if self.draft_fp8 and self.draft_quantization not in ("auto", "fp8"):
            raise ValueError(
                f"draft_fp8=True asks for fp8, draft_quantization={self.draft_quantization!r} for another format: "
                "give one of them"
            )
        return self


class SMCConfig(SamplingParams, EngineSettings):
    """Everything that shapes one SMC run: :class:`SamplingParams` and :class:`EngineSettings` in one
    flat, frozen model (the form ``generate`` and ``Engine`` keyword arguments take).

    ``config.sampling`` and ``config.engine_settings`` split it; ``SMCConfig.combine(sampling,
    settings)`` joins the two.
    """

    @property
    def sampling(self) -> SamplingParams:
        """The algorithm's settings of this config."""
        return SamplingParams(**{k: getattr(self, k) for k in SamplingParams.model_fields})

    @property
    def engine_settings(self) -> EngineSettings:
        """The engine's settings of this config."""
        return EngineSettings(**{k: getattr(self, k) for k in EngineSettings.model_fields})

    @classmethod
    def combine(cls, sampling: SamplingParams | None = None, settings: EngineSettings | None = None) -> SMCConfig:
        """One config from its two halves (defaults for a missing one)."""
        parts = [p.model_dump() for p in (sampling, settings) if p is not None]
        return cls(**{k: v for part in parts for k, v in part.items()})
