"""Fused sampling and token log-probs: Triton kernels == torch twins == smcgen/core/sampling.py semantics."""

from __future__ import annotations

import math

import pytest
import torch
import triton  # noqa: F401  (a dev dependency: these tests must run, never skip)

from smcgen.core.sampling import log_probs, sample_powered
from smcgen.kernels import sampling as ks

NEG_INF = float("-inf")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _rng(device: torch.device, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([seed], dtype=torch.int64, device=device),
        torch.tensor([offset], dtype=torch.int64, device=device),
    )


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """[R, V] bool -> [R, ceil(V/32)] int32 bitmask, bit v%32 of word v//32 (xgrammar's layout)."""
    r, v = allowed.shape
    words = (v + 31) // 32
    padded = torch.zeros(r, words * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.long()
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64, device=allowed.device)
    packed = (padded.view(r, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _logits(r: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, v, generator=g) * 2.0
    x[3, ::7] = NEG_INF  # some impossible tokens
    x[4] = NEG_INF  # a row where nothing is possible
    return x.to(dtype).to(device)


def _mask(r: int, v: int, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random allowed set per row, plus: row 1 all masked, row 2 a single allowed token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(r, v, generator=g) < 0.3
    allowed[1] = False
    allowed[2] = False
    allowed[2, v - 3] = True  # in the ragged tail
    packed = _pack(allowed)
    # garbage bits past V in the last word must be ignored
    packed[:, -1] |= torch.tensor(-(2**31), dtype=torch.int32)
    return allowed.to(device), packed.to(device)


def _assert_close_with_inf(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    assert torch.isfinite(a[fin]).all()
    torch.testing.assert_close(a[fin], b[fin], **TOL)


# (block, n_chunks): one program per row with a ragged last block, and the split + merge path
PLANS = [(256, None), (128, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_fused_sample_triton_equals_torch(device, dtype, masked, scale, alpha):
    r, v = 6, 1100
    logits = _logits(r, v, dtype, device)
    packed = _mask(r, v, device)[1] if masked else None
    seed, offset = _rng(device, 1234, 2**32 - 5000)  # counters cross the 32-bit boundary
    ref = ks.fused_sample_torch(logits, scale, alpha, seed, offset, packed)
    plan = PLANS[int(masked) ^ int(alpha == 1.0)]
    out = ks.fused_sample_triton(logits, scale, alpha, seed, offset, packed, block=plan[0], n_chunks=plan[1])
    assert out[0].dtype == torch.int64 and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    assert torch.equal(out[0], ref[0])
    _assert_close_with_inf(out[1], ref[1])
    _assert_close_with_inf(out[2], ref[2])
    # the row with no possible token
    assert int(ref[0][4]) == 0 and ref[1][4] == NEG_INF and ref[2][4] == NEG_INF
    if masked:
        assert int(ref[0][1]) == 0 and ref[1][1] == NEG_INF and ref[2][1] == NEG_INF
        assert int(ref[0][2]) == v - 3
        # one allowed token: the whole allowed mass is that token's
        assert math.isclose(float(ref[1][2]), float(ref[2][2]), abs_tol=1e-5)
    elif alpha == 1.0:
        assert torch.equal(ref[2][torch.arange(r) != 4].cpu(), torch.zeros(r - 1))


def test_default_plan_and_dispatch(device):
    r, v = 5, 700
    logits = _logits(r, v, torch.float32, device, seed=5)
    _, packed = _mask(r, v, device, seed=6)
    seed, offset = _rng(device, 7, 11)
    ref = ks.fused_sample_torch(logits, 1.3, 2.5, seed, offset, packed)
    out = ks.fused_sample_triton(logits, 1.3, 2.5, seed, offset, packed)
    assert torch.equal(out[0], ref[0])
    _assert_close_with_inf(out[1], ref[1])
    _assert_close_with_inf(out[2], ref[2])
    via = ks.fused_sample(logits, 1.3, 2.5, seed, offset, packed)
    expected = out if device.type == "cuda" else ref
    for a, b in zip(via, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_twin_matches_sample_powered_formulas(alpha):
    """log_p and log_norm are sample_powered's quantities for the returned token (temperature = 1/scale)."""
    r, v, temperature = 8, 300, 0.7
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(r, v, generator=g) * 3
    seed, offset = _rng(torch.device("cpu"), 3, 0)
    tokens, log_p, log_norm = ks.fused_sample_torch(logits, 1 / temperature, alpha, seed, offset)
    powered = alpha * log_probs(logits, temperature)
    torch.testing.assert_close(log_p, powered.gather(-1, tokens[:, None]).squeeze(-1), **TOL)
    _, _, ref_norm = sample_powered(logits, temperature, alpha, torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_norm.double(), ref_norm, **TOL)
    # masked: the normalizer runs over the allowed tokens only
    allowed, packed = _mask(r, v, torch.device("cpu"))
    tokens, log_p, log_norm = ks.fused_sample_torch(logits, 1 / temperature, alpha, seed, offset, packed)
    live = allowed.any(-1)
    assert allowed[live].gather(-1, tokens[live][:, None]).all()
    torch.testing.assert_close(log_p[live], powered.gather(-1, tokens[:, None]).squeeze(-1)[live], **TOL)
    ref_norm = torch.logsumexp(powered.masked_fill(~allowed, NEG_INF), dim=-1)
    torch.testing.assert_close(log_norm[live], ref_norm[live], **TOL)
    # smcgen/core/sampling.py's masked draw: same log-normalizer, and empty rows give token 0, -inf, -inf
    ref_tok, ref_p, ref_norm = sample_powered(logits, temperature, alpha, torch.Generator().manual_seed(0), packed)
    _assert_close_with_inf(log_norm, ref_norm.float())
    assert torch.equal(tokens[~live], ref_tok[~live]) and torch.equal(log_p[~live], ref_p[~live].float())


@pytest.mark.parametrize("alpha, masked", [(1.0, False), (2.5, True)])
def test_twin_token_frequencies(alpha, masked):
    """Empirical token frequencies match exp(lp - log_norm) (max-abs within 5 standard errors)."""
    v, n = 6, 20_000
    base = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5]])
    logits = base.expand(n, v).contiguous()
    packed = None
    allowed = torch.ones(1, v, dtype=torch.bool)
    if masked:
        allowed = torch.tensor([[True, True, False, True, True, False]])
        packed = _pack(allowed).expand(n, -1).contiguous()
    seed, offset = _rng(torch.device("cpu"), 2024, 99)
    tokens, log_p, log_norm = ks.fused_sample_torch(logits, 1 / 0.8, alpha, seed, offset, packed)
    lp = alpha * torch.log_softmax(base / 0.8, dim=-1)[0]
    probs = torch.exp(lp - torch.logsumexp(lp.masked_fill(~allowed[0], NEG_INF), 0)).masked_fill(~allowed[0], 0.0)
    freq = torch.bincount(tokens, minlength=v).double() / n
    se = torch.sqrt(probs.double() * (1 - probs.double()) / n)
    assert (freq - probs.double()).abs().max() <= (5 * se).max()
    assert freq[~allowed[0]].sum() == 0
    torch.testing.assert_close(log_p, lp[tokens], **TOL)
    torch.testing.assert_close(torch.exp(log_p - log_norm), probs[tokens], **TOL)


def test_offset_advance_gives_fresh_noise(device):
    """Counter layout offset + r*V + v: a call at offset R*V continues a 2R-row call at offset 0."""
    r, v = 4, 300
    logits = torch.zeros(r, v, device=device)  # flat: the token is pure noise
    seed, zero = _rng(device, 5, 0)
    advanced = torch.tensor([r * v], dtype=torch.int64, device=device)
    first = ks.fused_sample_triton(logits, 1.0, 1.0, seed, zero, None, block=128)[0]
    second = ks.fused_sample_triton(logits, 1.0, 1.0, seed, advanced, None, block=128)[0]
    assert not torch.equal(first, second)
    both = ks.fused_sample_torch(torch.cat([logits, logits]), 1.0, 1.0, seed, zero)[0]
    assert torch.equal(both, torch.cat([first, second]))
    # a different seed changes the draw too
    other = ks.fused_sample_torch(logits, 1.0, 1.0, seed + 1, zero)[0]
    assert not torch.equal(first, other)


def test_fused_sample_bad_input(device):
    logits = torch.zeros(2, 40, device=device)
    seed, offset = _rng(device, 0, 0)
    bad_mask = torch.zeros(2, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="bitmask"):
        ks.fused_sample(logits, 1.0, 1.0, seed, offset, bad_mask)
    with pytest.raises(ValueError, match="positive"):
        ks.fused_sample(logits, 1.0, 0.0, seed, offset)
    with pytest.raises(ValueError, match="int64"):
        ks.fused_sample(logits, 1.0, 1.0, seed.int(), offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale, alpha, t", [(1.0, 1.0, 1), (1 / 0.7, 2.5, 3)])
def test_token_logprobs_triton_equals_torch(device, dtype, scale, alpha, t):
    r, v = 3, 1100
    g = torch.Generator().manual_seed(9)
    full = torch.randn(r, t + 1, v, generator=g) * 2
    full[0, :, ::5] = NEG_INF
    logits = full[:, 1:].to(dtype).to(device) if t > 1 else full[:, :1].to(dtype).to(device)  # strided views
    tokens = torch.randint(0, v, (r, t), generator=g).to(device)
    tokens[0, 0] = 5  # a token whose logit is -inf
    ref = ks.token_logprobs_torch(logits, tokens, scale, alpha)
    assert ref[0, 0] == NEG_INF
    for block, n_chunks in PLANS:
        out = ks.token_logprobs_triton(logits, tokens, scale, alpha, block=block, n_chunks=n_chunks)
        assert out.shape == (r, t) and out.dtype == torch.float32
        _assert_close_with_inf(out, ref)
    expected = alpha * log_probs(logits.cpu(), 1 / scale).gather(-1, tokens.cpu()[..., None]).squeeze(-1)
    _assert_close_with_inf(ref.cpu(), expected)
    via = ks.token_logprobs(logits, tokens, scale, alpha)
    _assert_close_with_inf(via, ref)
