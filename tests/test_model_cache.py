"""A damaged embedded-model cache is detected on load and rebuilt, or the error says what is damaged
(issue 14, item 4). Every test works on a temporary copy of the cache (SMCGEN_CACHE), never on it."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from smcgen.models import smollm2
from smcgen.models.cache_check import CHECKSUMS_FILE, record_checksums, verify_cache

SUB = "smollm2-135m-instruct"


@pytest.fixture
def cache_copy(tmp_path, monkeypatch):
    """A private copy of the converted cache (real files, never links), with SMCGEN_CACHE pointing at it;
    pip may not reach an index or a local wheel folder, so a rebuild fails fast instead of downloading."""
    source = smollm2.ensure_converted(progress=False)
    dest = tmp_path / "cache" / SUB
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(CHECKSUMS_FILE))
    monkeypatch.setenv("SMCGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)  # a developer's local wheels would repair it
    return dest


def _load_error(match: str) -> str:
    with pytest.raises(RuntimeError) as err:
        smollm2.load_smollm2()
    msg = str(err.value)
    assert "damaged" in msg and match in msg and "rebuilding it failed" in msg
    return msg


def test_sound_copy_verifies_and_then_costs_only_a_stat(cache_copy):
    assert verify_cache(cache_copy) is None  # no checksums yet: structure checked, checksums recorded
    assert (cache_copy / CHECKSUMS_FILE).is_file()
    t0 = time.perf_counter()
    assert verify_cache(cache_copy) is None
    assert time.perf_counter() - t0 < 0.05  # nothing re-hashed
    model, tok = smollm2.load_smollm2()
    assert tok.eos_token_id == 2 and model.config.num_hidden_layers == 30


def test_truncated_weights(cache_copy):
    record_checksums(cache_copy)
    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    _load_error("model.safetensors has")
    assert not cache_copy.exists()  # moved aside and deleted: the next run converts afresh


def test_truncated_tokenizer(cache_copy):
    record_checksums(cache_copy)
    tok = cache_copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:1000])
    _load_error("tokenizer.json has 1000 bytes")


def test_invalid_config_of_the_same_size(cache_copy):
    record_checksums(cache_copy)
    cfg = cache_copy / "config.json"
    size = cfg.stat().st_size
    cfg.write_bytes(b"{" + b"x" * (size - 1))
    _load_error("config.json changed since it was written")


def test_random_bytes_in_the_weights(cache_copy):
    record_checksums(cache_copy)
    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(os.urandom(4096))
    _load_error("model.safetensors changed since it was written")


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:500]), "tokenizer.json"),
        (lambda d: os.truncate(d / "model.safetensors", 10_000_000), "model.safetensors is truncated"),
    ],
)
def test_cache_without_checksums_is_checked_for_structure(cache_copy, damage, words):
    """A cache converted before checksums existed: damage that breaks its structure is still caught."""
    damage(cache_copy)
    _load_error(words)
