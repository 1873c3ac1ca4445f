"""SMC weight update, ESS and branch-free systematic resampling, per group, on the device.

``smc_weight_update`` adds the incremental log-weights, computes each group's ESS, decides whether
to resample (no host sync: the decision stays on the device) and returns ancestors as global row ids
(identity for groups that do not resample), so a whole SMC cycle can be one CUDA graph replay.

Semantics (shared by the Triton kernel and its torch twin):

- ``log_w += inc`` (float32, in place).
- Per group b, with ``m = max_j log_w`` and ``w_j = exp(log_w_j - m)`` in float64:
  ``ESS = (sum w)^2 / sum w^2``, clamped into ``[1, N]`` like :func:`smcgen.core.resampling.effective_sample_size`
  (it is mathematically there; the clamp removes rounding excursions). A group whose weights are all
  ``-inf`` is *dead*: ``ESS = 0``, ``dead = True``, never resampled, log-weights left as they are.
- ``resampled = allow != 0 and (ESS < ess_threshold * N or ess_threshold >= 1) and not dead``; the
  comparison is made in float32 (``float32(ESS) < float32(ess_threshold * N)``).
- Systematic resampling: ``u0 = tl.rand(seed, offset + b)`` (B numbers per call; the caller advances
  ``offset`` by B); positions ``p_i = min((i + u0) / N, 1 - 2**-53)`` in float64; ancestor of ``i`` is the
  smallest ``j`` with ``c_j > p_i`` (clamped to N - 1), where ``c_j = C_j / C_{N-1}`` and ``C`` is the
  cumulative sum of the integer weights ``q_j = floor(w_j * 2**(62 - ceil(log2 N)))``.

  Why integers: a blocked float scan is not associative, so a dead particle (``w_j = 0``) could get
  a sliver ``c_j > c_{j-1}`` of probability; integer sums are exact, so ``C_j == C_{j-1}`` for every
  zero weight and -inf particles are never chosen, the last live particle has ``c_j == 1.0`` exactly
  (so the search always ends on a live particle), and the twin's ``torch.cumsum`` gives the very same
  ``C``. The quantum ``2**-(62 - ceil(log2 N))`` relative to the largest weight (<= 2**-50 for
  N <= 4096) is about float64's own resolution, so this matches smcgen.core.resampling's float64 CDF up
  to rounding. Each particle gets ``floor(N wbar_j)`` or ``ceil(N wbar_j)`` copies.
- Resampled groups: every log-weight becomes ``logsumexp_j(log_w) - log N`` (keeps the running
  ``log Z_hat = logsumexp(log_w) - log N`` unbiased). Ancestors are global row ids ``b * N + j``.
- Preconditions: log-weights are finite or ``-inf`` (``+inf``/NaN give unspecified results).

Triton: one program per group, blocked over N (BLOCK <= 1024, any N): pass 1 adds ``inc`` and takes
the max, pass 2 the sums, and only if the group resamples, pass 3 writes the integer CDF to a scratch
buffer and pass 4 binary-searches it (``bit_length(N)`` steps) for each position; otherwise pass 3
writes identity ancestors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smcgen.core.resampling import _inverse_cdf
from smcgen.kernels._triton import HAS_TRITON, require_triton, tl, triton, use_triton
from smcgen.kernels.philox import philox_uniform

__all__ = ["HAS_TRITON", "smc_weight_update", "smc_weight_update_torch", "smc_weight_update_triton"]


def _quant_scale(n: int) -> float:
    """2**(62 - ceil(log2 N)): the integer weight of the largest particle; N of them fit in int64."""
    return float(2 ** (62 - max(0, (n - 1).bit_length())))


def _check_args(log_w: Tensor, inc: Tensor, seed: Tensor, offset: Tensor, allow: Tensor) -> None:
    """Host-side shape/dtype checks (no device sync)."""
    if log_w.dim() != 2 or log_w.dtype != torch.float32:
        raise ValueError(f"log_w must be float32 [B, N], got {log_w.dtype} {tuple(log_w.shape)}")
    if log_w.shape[1] == 0:
        raise ValueError("log_w needs at least one particle per group (N >= 1)")
    if inc.shape != log_w.shape:
        raise ValueError(f"inc must match log_w's shape {tuple(log_w.shape)}, got {tuple(inc.shape)}")
    for name, t, dtype in (("seed", seed, torch.int64), ("offset", offset, torch.int64), ("allow", allow, torch.int32)):
        if t.dtype != dtype or t.numel() != 1:
            raise ValueError(f"{name} must be a {dtype} tensor of shape [1], got {t.dtype} {tuple(t.shape)}")
        if t.device != log_w.device:
            raise ValueError(f"{name} is on {t.device} but log_w is on {log_w.device}")


def smc_weight_update_torch(
    log_w: Tensor,
    inc: Tensor,
    ess_threshold: float,
    seed: Tensor,
    offset: Tensor,
    allow: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Torch twin of :func:`smc_weight_update_triton` (same ancestors for the same Philox stream).

    Args:
        log_w: ``[B, N]`` float32 log-weights, updated in place.
        inc: ``[B, N]`` incremental log-weights (any float dtype; added in float32).
        ess_threshold: resample when ``ESS < ess_threshold * N``; ``>= 1`` always resamples.
        seed, offset: int64 ``[1]`` tensors on ``log_w``'s device; group b uses counter ``offset + b``.
        allow: int32 ``[1]``; 0 means never resample in this call.

    Returns:
        ``(ancestors [B*N] int64 global row ids, ess [B] f32, resampled [B] bool, dead [B] bool)``.
    """
    _check_args(log_w, inc, seed, offset, allow)
    b, n = log_w.shape
    dev = log_w.device
    log_w.add_(inc.to(torch.float32))
    lw = log_w.double()
    m = lw.amax(dim=-1)
    dead = m == float("-inf")
    shift = torch.where(dead, 0.0, m)
    w = torch.exp(lw - shift[:, None])
    s1 = w.sum(dim=-1)
    s2 = (w * w).sum(dim=-1)
    ess = (s1 * s1 / torch.where(dead, 1.0, s2)).clamp(min=1.0, max=float(n))
    ess = torch.where(dead, 0.0, ess).float()
    # the kernel receives ess_threshold * N as a float32 argument; round it the same way (host-side)
    limit = float(torch.tensor(ess_threshold * n, dtype=torch.float32))
    want = torch.ones_like(dead) if ess_threshold >= 1 else ess < limit
    resampled = (allow != 0) & want & ~dead

    u0 = philox_uniform(seed, offset + torch.arange(b, device=dev, dtype=torch.int64))
    cum = torch.floor(w * _quant_scale(n)).to(torch.int64).cumsum(dim=-1)
    cdf = cum.double() / cum[:, -1:].double()  # dead groups: 0/0, unused
    grid = torch.arange(n, device=dev, dtype=torch.float64)
    picked = _inverse_cdf(cdf.contiguous(), (grid[None, :] + u0.double()[:, None]) / n)
    local = torch.where(resampled[:, None], picked, grid.to(torch.int64)[None, :])
    ancestors = (local + torch.arange(b, device=dev, dtype=torch.int64)[:, None] * n).reshape(-1)

    reset = (shift + torch.log(s1) - math.log(n)).float()
    log_w.copy_(torch.where(resampled[:, None], reset[:, None], log_w))
    return ancestors, ess, resampled, dead


if HAS_TRITON:
    # N is never specialized into a constexpr (N == 1 would be), since the kernel calls N.to(...)
    @triton.jit(do_not_specialize=["N"])
    def _weight_update_kernel(
        log_w_ptr,
        inc_ptr,
        anc_ptr,
        ess_ptr,
        res_ptr,
        dead_ptr,
        cum_ptr,
        seed_ptr,
        offset_ptr,
        allow_ptr,
        N,
        limit,
        ALWAYS: tl.constexpr,
        QSCALE: tl.constexpr,
        N_SEARCH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program per group: update, ESS, decision, then systematic ancestors or identity."""
        neg_inf = float("-inf")
        grp = tl.program_id(0).to(tl.int64)
        base = grp * N
        lane = tl.arange(0, BLOCK)

        # pass 1: log_w += inc, running max (while loops: the interpreter rejects tensor range bounds)
        m = tl.full([], neg_inf, tl.float32)
        start = 0
        while start < N:
            idx = start + lane
            inb = idx < N
            lw = tl.load(log_w_ptr + base + idx, mask=inb, other=neg_inf)
            lw = lw + tl.load(inc_ptr + base + idx, mask=inb, other=0.0).to(tl.float32)
            tl.store(log_w_ptr + base + idx, lw, mask=inb)
            m = tl.maximum(m, tl.max(lw, axis=0))
            start += BLOCK
        dead = m == neg_inf
        shift = tl.where(dead, 0.0, m).to(tl.float64)

        # pass 2: sum w and sum w^2 in float64 (each thread re-reads exactly what it stored)
        s1 = tl.full([], 0.0, tl.float64)
        s2 = tl.full([], 0.0, tl.float64)
        start = 0
        while start < N:
            idx = start + lane
            lw = tl.load(log_w_ptr + base + idx, mask=idx < N, other=neg_inf).to(tl.float64)
            w = tl.exp(lw - shift)
            s1 += tl.sum(w, axis=0)
            s2 += tl.sum(w * w, axis=0)
            start += BLOCK
        n_f = N.to(tl.float64)
        ess = s1 * s1 / tl.where(dead, 1.0, s2)
        ess = tl.minimum(tl.maximum(ess, 1.0), n_f)
        ess = tl.where(dead, 0.0, ess).to(tl.float32)
        allowed = tl.load(allow_ptr) != 0
        if ALWAYS:
            resample = allowed & ~dead
        else:
            resample = allowed & (ess < limit) & ~dead
        tl.store(ess_ptr + grp, ess)
        tl.store(res_ptr + grp, resample)
        tl.store(dead_ptr + grp, dead)

        if resample:
            # pass 3: integer cumulative weights -> scratch (exact, so zero weights get zero width)
            carry = tl.full([], 0, tl.int64)
            start = 0
            while start < N:
                idx = start + lane
                inb = idx < N
                lw = tl.load(log_w_ptr + base + idx, mask=inb, other=neg_inf).to(tl.float64)
                # float -> int truncates, i.e. floors these non-negative values
                q = (tl.exp(lw - shift) * QSCALE).to(tl.int64)
                tl.store(cum_ptr + base + idx, tl.cumsum(q, axis=0) + carry, mask=inb)
                carry += tl.sum(q, axis=0)
                start += BLOCK
            total = carry.to(tl.float64)
            # the search below reads entries other threads wrote
            tl.debug_barrier()
            u0 = tl.rand(tl.load(seed_ptr), tl.load(offset_ptr) + grp).to(tl.float64)
            reset = (shift + tl.log(s1) - tl.log(n_f)).to(tl.float32)
            below_one = tl.full([], 0.9999999999999999, tl.float64)  # exact float64, not a float32 literal

            # pass 4: ancestor of i = smallest j with C_j / C_{N-1} > (i + u0) / N
            start = 0
            while start < N:
                idx = start + lane
                inb = idx < N
                pos = tl.minimum((idx.to(tl.float64) + u0) / n_f, below_one)
                lo = tl.zeros([BLOCK], tl.int32)
                hi = tl.zeros([BLOCK], tl.int32) + N
                for _ in tl.static_range(N_SEARCH):
                    active = lo < hi
                    mid = (lo + hi) // 2
                    c_mid = tl.load(cum_ptr + base + mid, mask=active & inb, other=0).to(tl.float64) / total
                    right = c_mid <= pos
                    lo = tl.where(active & right, mid + 1, lo)
                    hi = tl.where(active & ~right, mid, hi)
                anc = tl.minimum(lo, N - 1)
                tl.store(anc_ptr + base + idx, base + anc, mask=inb)
                tl.store(log_w_ptr + base + idx, tl.zeros([BLOCK], tl.float32) + reset, mask=inb)
                start += BLOCK
        else:
            start = 0
            while start < N:
                idx = start + lane
                tl.store(anc_ptr + base + idx, base + idx, mask=idx < N)
                start += BLOCK


def smc_weight_update_triton(
    log_w: Tensor,
    inc: Tensor,
    ess_threshold: float,
    seed: Tensor,
    offset: Tensor,
    allow: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton weight update + ESS + systematic resampling, one program per group; see the module docstring.

    Same arguments and results as :func:`smc_weight_update_torch`; CUDA-graph safe (seed, offset and
    allow read on device; no host sync). Uses B Philox numbers.
    """
    require_triton()
    _check_args(log_w, inc, seed, offset, allow)
    if not log_w.is_contiguous():
        raise ValueError("log_w must be contiguous (it is updated in place)")
    b, n = log_w.shape
    dev = log_w.device
    inc = inc.contiguous()
    ancestors = torch.empty(b * n, dtype=torch.int64, device=dev)
    ess = torch.empty(b, dtype=torch.float32, device=dev)
    resampled = torch.empty(b, dtype=torch.bool, device=dev)
    dead = torch.empty(b, dtype=torch.bool, device=dev)
    if b == 0:
        return ancestors, ess, resampled, dead
    cum = torch.empty(b * n, dtype=torch.int64, device=dev)
    block = min(1024, triton.next_power_of_2(n))
    _weight_update_kernel[(b,)](
        log_w,
        inc,
        ancestors,
        ess,
        resampled,
        dead,
        cum,
        seed,
        offset,
        allow,
        n,
        float(ess_threshold * n),
        ALWAYS=ess_threshold >= 1,
        QSCALE=_quant_scale(n),
        N_SEARCH=n.bit_length(),
        BLOCK=block,
        num_warps=max(1, min(8, block // 128)),
    )
    return ancestors, ess, resampled, dead


def smc_weight_update(
    log_w: Tensor,
    inc: Tensor,
    ess_threshold: float,
    seed: Tensor,
    offset: Tensor,
    allow: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Add incremental log-weights, compute ESS and resample low-ESS groups (systematic), on device.

    Dispatches to :func:`smc_weight_update_triton` on CUDA tensors, :func:`smc_weight_update_torch`
    otherwise. Returns ``(ancestors [B*N] int64, ess [B] f32, resampled [B] bool, dead [B] bool)``.
    """
    fn = smc_weight_update_triton if use_triton(log_w) else smc_weight_update_torch
    return fn(log_w, inc, ess_threshold, seed, offset, allow)
