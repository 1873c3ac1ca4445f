"""SMC weight update + ESS + systematic resampling: Triton kernel == torch twin == smcgen.core.resampling."""

from __future__ import annotations

import math

import pytest
import torch
import triton  # noqa: F401  (a dev dependency: these tests must run, never skip)

from smcgen.core import resampling
from smcgen.kernels import weighting as kw
from smcgen.kernels.philox import philox_uniform

NEG_INF = float("-inf")


def _rng(device: torch.device, seed: int = 7, offset: int = 123, allow: int = 1):
    return (
        torch.tensor([seed], dtype=torch.int64, device=device),
        torch.tensor([offset], dtype=torch.int64, device=device),
        torch.tensor([allow], dtype=torch.int32, device=device),
    )


def _weights(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups: 0 random, 1 dead, 2 a third dead, 3 uniform, 4 one live particle, 5+ very uneven."""
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn(b, n, generator=g) * 2
    inc = torch.randn(b, n, generator=g)
    log_w[1] = NEG_INF
    log_w[2, ::3] = NEG_INF
    log_w[3] = 0.5
    inc[3] = -1.0
    log_w[4] = NEG_INF
    log_w[4, n // 2] = 3.0
    log_w[5:] *= 10
    return log_w, inc


def _run_both(log_w, inc, thr, device, **rng):
    a = log_w.clone().to(device)
    b = log_w.clone().to(device)
    inc = inc.to(device)
    seed, offset, allow = _rng(device, **rng)
    out_t = kw.smc_weight_update_triton(a, inc, thr, seed, offset, allow)
    out_r = kw.smc_weight_update_torch(b, inc, thr, seed, offset, allow)
    return out_t, a, out_r, b


def _assert_same(out_t, lw_t, out_r, lw_r) -> None:
    anc_t, ess_t, res_t, dead_t = out_t
    anc_r, ess_r, res_r, dead_r = out_r
    assert anc_t.dtype == torch.int64 and ess_t.dtype == torch.float32
    assert res_t.dtype == torch.bool and dead_t.dtype == torch.bool
    assert torch.equal(anc_t, anc_r)
    assert torch.equal(res_t, res_r)
    assert torch.equal(dead_t, dead_r)
    torch.testing.assert_close(ess_t, ess_r, rtol=1e-6, atol=0.0)
    assert torch.equal(torch.isneginf(lw_t), torch.isneginf(lw_r))
    fin = torch.isfinite(lw_r)
    torch.testing.assert_close(lw_t[fin], lw_r[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("thr", [0.5, 1.0])
@pytest.mark.parametrize("n", [1300, 37])  # > one 1024 block and ragged; a single small block
def test_triton_equals_torch(device, thr, n):
    b = 7
    log_w, inc = _weights(b, n)
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, thr, device)
    _assert_same(out_t, lw_t, out_r, lw_r)
    anc, ess, res, dead = (t.cpu() for t in out_r)
    assert dead.tolist() == [False, True, False, False, False, False, False]
    assert ess[1] == 0 and not res[1]
    assert ess[3] == n and res[3] == (thr >= 1)  # uniform weights: ESS = N
    assert ess[4] == 1 and res[4]  # one live particle
    assert res[5] and res[6]
    # one live particle: everyone descends from it
    assert torch.equal(anc.view(b, n)[4], torch.full((n,), 4 * n + n // 2))


def test_identity_when_not_resampling(device):
    b, n = 3, 50
    log_w, inc = _weights(b + 3, n)
    log_w, inc = log_w[[0, 1, 3]].contiguous(), inc[[0, 1, 3]].contiguous()
    identity = torch.arange(b * n)
    # allow = 0: never resample, even with thr >= 1; weights just accumulate
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, 1.0, device, allow=0)
    _assert_same(out_t, lw_t, out_r, lw_r)
    assert torch.equal(out_t[0].cpu(), identity) and not out_t[2].any()
    assert torch.equal(lw_t.cpu(), log_w + inc)
    # high ESS (uniform group) with thr 0.5: identity for that group
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, 0.5, device)
    _assert_same(out_t, lw_t, out_r, lw_r)
    assert not bool(out_t[2][2])
    assert torch.equal(out_t[0].cpu()[2 * n :], identity[2 * n :])


def test_always_resamples_at_threshold_one_and_keeps_z(device):
    b, n = 4, 64
    g = torch.Generator().manual_seed(4)
    log_w = torch.zeros(b, n)
    inc = torch.randn(b, n, generator=g) * 0.01  # ESS ~ N: only thr >= 1 resamples
    before = torch.logsumexp(log_w + inc, dim=-1)
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, 1.0, device)
    _assert_same(out_t, lw_t, out_r, lw_r)
    assert out_t[2].all()
    # weights reset to the mean: logsumexp (hence log Z_hat) unchanged, all equal
    lw = lw_t.cpu()
    torch.testing.assert_close(torch.logsumexp(lw, dim=-1), before, rtol=1e-6, atol=1e-6)
    assert torch.equal(lw, lw[:, :1].expand(b, n))
    torch.testing.assert_close(lw[:, 0], before - math.log(n))


def test_dead_particles_never_chosen_and_counts_systematic(device):
    b, n = 16, 200
    g = torch.Generator().manual_seed(8)
    log_w = torch.randn(b, n, generator=g) * 4
    log_w[torch.rand(b, n, generator=g) < 0.5] = NEG_INF
    log_w[:, -1] = NEG_INF  # the last particle dead: the clamp to N-1 must not pick it
    log_w[0, :-2] = NEG_INF  # only particle n-2 alive
    inc = torch.zeros(b, n)
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, 1.0, device, seed=11, offset=2**32 - 3)
    _assert_same(out_t, lw_t, out_r, lw_r)
    local = out_t[0].cpu().view(b, n) - torch.arange(b)[:, None] * n
    assert ((local >= 0) & (local < n)).all()
    assert torch.isfinite(log_w.gather(1, local)).all()
    # systematic: particle j gets floor(N wbar_j) or ceil(N wbar_j) offspring; sorted ancestors
    counts = resampling.offspring_counts(local, n).double()
    expected = n * torch.exp(resampling.normalized_log_weights(log_w.double()))
    assert (counts >= torch.floor(expected - 1e-9)).all() and (counts <= torch.ceil(expected + 1e-9)).all()
    assert (local[:, 1:] >= local[:, :-1]).all()


def test_groups_independent(device):
    """Each group gives the same result alone (at counter offset + b) as in the batch."""
    b, n = 5, 90
    log_w, inc = _weights(b + 2, n, seed=3)
    log_w, inc = log_w[[0, 2, 4, 5, 6]].contiguous(), inc[[0, 2, 4, 5, 6]].contiguous()
    seed, offset, allow = _rng(device, seed=21, offset=500)
    lw_all = log_w.clone().to(device)
    anc_all, ess_all, res_all, _ = kw.smc_weight_update_triton(lw_all, inc.to(device), 0.5, seed, offset, allow)
    for grp in range(b):
        lw_one = log_w[grp : grp + 1].clone().to(device)
        anc, ess, res, _ = kw.smc_weight_update_triton(
            lw_one, inc[grp : grp + 1].to(device), 0.5, seed, offset + grp, allow
        )
        assert torch.equal(anc + grp * n, anc_all[grp * n : (grp + 1) * n])
        assert torch.equal(ess, ess_all[grp : grp + 1]) and torch.equal(res, res_all[grp : grp + 1])
        assert torch.equal(lw_one, lw_all[grp : grp + 1])


def test_twin_agrees_with_resampling_module(monkeypatch):
    """Same u0 -> same ancestors as smcgen.core.resampling.SystematicResampler; same ESS as effective_sample_size."""
    b, n = 6, 300
    log_w, inc = _weights(b + 1, n, seed=5)
    log_w, inc = log_w[[0, 2, 3, 4, 5, 6]].contiguous(), inc[[0, 2, 3, 4, 5, 6]].contiguous()
    seed, offset, allow = _rng(torch.device("cpu"), seed=1, offset=77)
    updated = log_w + inc
    lw = log_w.clone()
    anc, ess, res, _ = kw.smc_weight_update_torch(lw, inc, 1.0, seed, offset, allow)
    torch.testing.assert_close(ess, resampling.effective_sample_size(updated), rtol=1e-5, atol=0.0)
    u0 = philox_uniform(seed, offset + torch.arange(b)).double()
    monkeypatch.setattr(resampling, "_uniform", lambda shape, like, generator: u0.reshape(shape))
    expected = resampling.SystematicResampler().ancestors(updated)
    assert res.all()
    assert torch.equal(anc.view(b, n) - torch.arange(b)[:, None] * n, expected)


def test_single_particle_and_dispatch(device):
    log_w = torch.tensor([[0.3], [NEG_INF]])
    inc = torch.tensor([[0.2], [1.0]])
    out_t, lw_t, out_r, lw_r = _run_both(log_w, inc, 1.0, device)
    _assert_same(out_t, lw_t, out_r, lw_r)
    assert out_t[0].tolist() == [0, 1] and out_t[2].tolist() == [True, False] and out_t[3].tolist() == [False, True]
    lw = log_w.clone().to(device)
    via = kw.smc_weight_update(lw, inc.to(device), 1.0, *_rng(device))
    for a, b in zip(via, out_t, strict=True):
        assert torch.equal(a, b)


def test_bad_input(device):
    seed, offset, allow = _rng(device)
    with pytest.raises(ValueError, match="float32"):
        kw.smc_weight_update(
            torch.zeros(2, 3, dtype=torch.float64, device=device), torch.zeros(2, 3), 0.5, seed, offset, allow
        )
    with pytest.raises(ValueError, match="allow"):
        kw.smc_weight_update(
            torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device), 0.5, seed, offset, allow.long()
        )
