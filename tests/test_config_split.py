"""The settings split: SamplingParams (the algorithm) and EngineSettings (the engine) make up SMCConfig,
and every place that takes a config takes either half, both, or the old flat keywords."""

from __future__ import annotations

import pydantic
import pytest
from tiny_models import tiny_lm

import smcgen
from smcgen import EngineSettings, SamplingParams, SMCConfig
from smcgen.validation import as_config


def test_halves_partition_the_flat_config():
    sampling, settings = set(SamplingParams.model_fields), set(EngineSettings.model_fields)
    assert not sampling & settings
    assert sampling | settings == set(SMCConfig.model_fields)
    assert {"n_particles", "block_size", "alpha", "seed"} <= sampling
    assert {"engine", "draft_quantization"} <= settings


def test_split_and_combine_round_trip():
    cfg = SMCConfig(n_particles=16, alpha=2.0, engine="generic", draft_quantization="none")
    assert cfg.sampling.n_particles == 16 and cfg.engine_settings.engine == "generic"
    assert SMCConfig.combine(cfg.sampling, cfg.engine_settings) == cfg
    assert SMCConfig.combine(SamplingParams(n_particles=3)).engine == "auto"


def test_as_config_takes_halves_tuples_and_old_keywords():
    merged = as_config((SamplingParams(n_particles=5), EngineSettings(engine="generic")), {"block_size": 2})
    assert (merged.n_particles, merged.engine, merged.block_size) == (5, "generic", 2)
    assert as_config(SamplingParams(seed=7), {}).seed == 7
    assert as_config(None, {"n_particles": 4, "engine": "generic"}).n_particles == 4
    with pytest.raises(TypeError, match="SamplingParams"):
        as_config(42, {})
    with pytest.raises(pydantic.ValidationError, match="n_particles"):
        SamplingParams(n_particles=0)
    with pytest.raises(pydantic.ValidationError, match="engine"):
        SamplingParams(engine="native")  # an engine setting is not an algorithm setting


def test_generate_with_both_halves_equals_flat_keywords():
    lm = tiny_lm(seed=1, vocab=8, eos=7, layers=1, hidden=16)
    a = smcgen.generate(
        lm, [0, 1], config=(SamplingParams(n_particles=3, max_new_tokens=4, seed=2), EngineSettings(engine="generic"))
    )
    b = smcgen.generate(lm, [0, 1], n_particles=3, max_new_tokens=4, seed=2, engine="generic")
    assert a.sequences == b.sequences and a.engine == b.engine == "generic"
