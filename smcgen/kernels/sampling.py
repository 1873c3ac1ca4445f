"""Fused sampling over the vocabulary: token, its log-probability and the allowed-set log-normalizer.

``fused_sample`` draws one token per row from ``softmax(alpha * log_softmax(scale * logits))``
restricted to the allowed tokens, by Gumbel-max with Philox noise, and returns the token's
log-probability under the *unmasked* powered distribution plus the log-normalizer over the allowed
set, all in one pass over the vocabulary. ``token_logprobs`` scores given tokens (verify step).

Semantics (shared by the Triton kernels and their torch twins; smcgen/core/sampling.py is the reference):

- ``s = scale * logits`` in float32; ``lse = logsumexp_v s`` over ALL tokens; ``lp = alpha * (s - lse)``.
- Noise: ``u[r, v] = tl.rand(seed, offset + r*V + v)`` (see :mod:`smcgen.kernels.philox`), clamped into
  ``[tiny, 1 - eps]`` like smcgen/core/sampling.py; ``G = -log(-log(u))``. One call uses ``R * V`` numbers;
  the caller advances ``offset`` by that much.
- A token is a *candidate* iff it is allowed (bit ``v % 32`` of word ``v // 32`` of its row's int32
  bitmask, xgrammar's layout) and its logit is not ``-inf``.
  ``token = argmax_{candidates} alpha * s + G`` (the constant ``-alpha * lse`` does not change the
  argmax and is unknown until the pass ends); ties go to the smallest token id, like torch.argmax.
- ``log_p = lp[token]``; ``log_norm = logsumexp_{candidates} lp`` -- except that with no mask and
  ``alpha == 1`` it is exactly 0 (its exact value; smcgen/core/sampling.py does the same so that Z_hat
  does not drift by rounding).
- A row with no candidate (everything masked, or every logit ``-inf``): token 0, ``log_p = -inf``,
  ``log_norm = -inf``.
- Preconditions (not checked on device, to stay sync-free): ``scale > 0`` and ``alpha > 0`` (checked
  on the host), logits finite or ``-inf`` (``+inf``/NaN give unspecified tokens and NaN outputs).

Triton grid (``_plan``): fused_sample is bound by the Philox rounds (one Philox block call per
vocabulary entry, tens of integer multiplies), not by memory, so with few rows one program per row
leaves most SMs idle. Each row's vocabulary is therefore cut into ``n_chunks`` chunks of whole
BLOCKs, one program per (row, chunk), each scanning its chunk in BLOCK steps (online max / sum-exp
/ running Gumbel argmax) and writing 7 partials; a tiny second kernel merges a row's chunks.
``n_chunks = min(ceil(4 * SMs / R), ceil(V / BLOCK))``: about 4 programs per SM, and 1 (no merge
pass; the scan kernel finishes the row itself) once R >= 4 * SMs (528 on an H100). BLOCK is 2048
with 8 warps (~8 elements per thread). Measured on an H100, bf16, V = 128256 (timings were noisy
between runs): R = 8 in 18-42 us (one program per row: 168 us), R = 64 ~75 us, R = 576 ~610 us.
token_logprobs is memory-bound and uses the same split with BLOCK 4096 (576 rows: ~76 us, ~1.9 TB/s).
Token choice does not depend on the plan (keys are computed per element); only the rounding of
``lse``/``log_norm`` does (last-ulp level). The chunk loops are ``while`` loops because Triton's CPU
interpreter (with numpy >= 2.4) cannot take tensor bounds in ``range()``.

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smcgen.core.sampling import allowed_from_bitmask, bitmask_width, gumbel_from_uniform
from smcgen.kernels._triton import (
    HAS_TRITON,
    require_triton,
    sm_count,
    tl,
    triton,
    use_triton,
)
from smcgen.kernels.philox import philox_uniform

__all__ = [
    "HAS_TRITON",
    "fused_sample",
    "fused_sample_torch",
    "fused_sample_triton",
    "token_logprobs",
    "token_logprobs_torch",
    "token_logprobs_triton",
]

# rows of the torch twin's Philox stream handled at once (bounds its int64 temporaries to ~100 MB)
_TWIN_CHUNK_ELEMS = 1 << 21


# ----------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------


def _check_rng(seed: Tensor, offset: Tensor, device: torch.device) -> None:
    """Seed and offset must be int64 device tensors of shape [1] (read inside the kernels)."""
    for name, t in (("seed", seed), ("offset", offset)):
        if t.dtype != torch.int64 or t.numel() != 1:
            raise ValueError(f"{name} must be an int64 tensor of shape [1], got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def _check_sample_args(logits: Tensor, scale: float, alpha: float, allowed: Tensor | None) -> None:
    """Host-side shape and scalar checks (no device sync)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [R, V], got {tuple(logits.shape)}")
    if not scale > 0 or not alpha > 0:
        raise ValueError(f"scale and alpha must be positive, got scale={scale}, alpha={alpha}")
    if allowed is not None:
        words = bitmask_width(logits.shape[1])
        if allowed.dtype != torch.int32 or tuple(allowed.shape) != (logits.shape[0], words):
            raise ValueError(
                f"allowed must be an int32 bitmask of shape {(logits.shape[0], words)}, "
                f"got {allowed.dtype} {tuple(allowed.shape)}"
            )
        if allowed.device != logits.device:
            raise ValueError(f"allowed is on {allowed.device} but logits are on {logits.device}")


# ----------------------------------------------------------------------------------------------------
# torch twins
# ----------------------------------------------------------------------------------------------------


def fused_sample_torch(
    logits: Tensor,
    scale: float,
    alpha: float,
    seed: Tensor,
    offset: Tensor,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Torch twin of :func:`fused_sample_triton`: same tokens (same Philox stream), same formulas.

    Args:
        logits: ``[R, V]`` bf16/f16/f32.
        scale: multiplies the logits (1 / temperature), > 0.
        alpha: power applied to the normalized distribution, > 0.
        seed, offset: int64 ``[1]`` tensors on the logits' device; noise for (r, v) is Philox
            counter ``offset + r * V + v``; ``R * V`` numbers are used.
        allowed: optional int32 bitmask ``[R, ceil(V / 32)]`` (1 = allowed).

    Returns:
        ``(tokens [R] int64, log_p [R] f32, log_norm [R] f32)`` as described in the module docstring.
    """
    _check_sample_args(logits, scale, alpha, allowed)
    _check_rng(seed, offset, logits.device)
    r, v = logits.shape
    s = logits.float() * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    ok = s > float("-inf")
    if allowed is not None:
        ok &= allowed_from_bitmask(allowed, v, allowed.device)

    # Gumbel keys in row chunks: the int64 Philox temporaries of the whole [R, V] would be large
    tokens = torch.empty(r, dtype=torch.int64, device=logits.device)
    rows_per_chunk = max(1, _TWIN_CHUNK_ELEMS // max(v, 1))
    cols = torch.arange(v, device=logits.device, dtype=torch.int64)
    for r0 in range(0, r, rows_per_chunk):
        r1 = min(r, r0 + rows_per_chunk)
        rows = torch.arange(r0, r1, device=logits.device, dtype=torch.int64)
        counters = offset.reshape(1, 1) + rows[:, None] * v + cols[None, :]
        key = alpha * s[r0:r1] + gumbel_from_uniform(philox_uniform(seed.reshape(1, 1), counters))
        key = torch.where(ok[r0:r1], key, float("-inf"))
        tokens[r0:r1] = torch.argmax(key, dim=-1)

    lp = alpha * (s - lse)
    log_p = lp.gather(-1, tokens[:, None]).squeeze(-1)
    if allowed is None and alpha == 1.0:
        log_norm = torch.zeros(r, dtype=torch.float32, device=logits.device)
    else:
        log_norm = torch.logsumexp(torch.where(ok, lp, float("-inf")), dim=-1)
    nonempty = ok.any(dim=-1)
    tokens = torch.where(nonempty, tokens, 0)
    log_p = torch.where(nonempty, log_p, float("-inf"))
    log_norm = torch.where(nonempty, log_norm, float("-inf"))
    return tokens, log_p, log_norm


def token_logprobs_torch(logits: Tensor, tokens: Tensor, scale: float, alpha: float) -> Tensor:
    """Torch twin of :func:`token_logprobs_triton`: ``alpha * (s[tok] - logsumexp_v s)``, ``s = scale * logits``.

    Args:
        logits: ``[R, T, V]`` bf16/f16/f32.
        tokens: ``[R, T]`` int64 in ``[0, V)``.
        scale, alpha: as in :func:`fused_sample_torch`.

    Returns:
        ``[R, T]`` float32.
    """
    _check_logprob_args(logits, tokens, scale, alpha)
    s = logits.float() * scale
    lse = torch.logsumexp(s, dim=-1)
    return alpha * (s.gather(-1, tokens[..., None].long()).squeeze(-1) - lse)


def _check_logprob_args(logits: Tensor, tokens: Tensor, scale: float, alpha: float) -> None:
    """Host-side shape and scalar checks for token_logprobs."""
    if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"need logits [R, T, V] and tokens [R, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if not scale > 0 or not alpha > 0:
        raise ValueError(f"scale and alpha must be positive, got scale={scale}, alpha={alpha}")


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _scan_chunk(
        row_ptr,
        mask_row_ptr,
        seed,
        counter_base,
        scale,
        alpha,
        v_lo,
        v_hi,
        BLOCK: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """Online scan of tokens [v_lo, v_hi) of one row: (m, z, m_a, z_a, best_key, best_tok, best_s).

        m/z: running max of s and sum exp(s - m) over all tokens; m_a/z_a: max of s and
        sum exp(alpha * (s - m_a)) over candidates; best_*: running Gumbel argmax over candidates.
        """
        neg_inf = float("-inf")
        m = tl.full([], neg_inf, tl.float32)
        z = tl.full([], 0.0, tl.float32)
        m_a = tl.full([], neg_inf, tl.float32)
        z_a = tl.full([], 0.0, tl.float32)
        best_key = tl.full([], neg_inf, tl.float32)
        best_tok = tl.full([], 0, tl.int32)
        best_s = tl.full([], neg_inf, tl.float32)
        lane = tl.arange(0, BLOCK)
        start = v_lo
        # a while loop rather than range(): the CPU interpreter cannot take tensor bounds in range()
        while start < v_hi:
            cols = start + lane
            inb = cols < v_hi
            s = tl.load(row_ptr + cols, mask=inb, other=neg_inf).to(tl.float32) * scale

            # all tokens: online logsumexp; shifting by 0 while everything is -inf avoids -inf - -inf
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shift = tl.where(m_new == neg_inf, 0.0, m_new)
            z = z * tl.exp(m - shift) + tl.sum(tl.exp(s - shift), axis=0)
            m = m_new

            ok = inb & (s > neg_inf)
            if HAS_MASK:
                word = tl.load(mask_row_ptr + cols // 32, mask=inb, other=0)
                ok = ok & (((word >> (cols % 32)) & 1) != 0)
            s_ok = tl.where(ok, s, neg_inf)
            m_a_new = tl.maximum(m_a, tl.max(s_ok, axis=0))
            shift_a = tl.where(m_a_new == neg_inf, 0.0, m_a_new)
            z_a = z_a * tl.exp(alpha * (m_a - shift_a)) + tl.sum(tl.exp(alpha * (s_ok - shift_a)), axis=0)
            m_a = m_a_new

            u = tl.rand(seed, counter_base + cols)
            u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.9999998807907104)
            key = tl.where(ok, alpha * s + (-tl.log(-tl.log(u))), neg_inf)
            blk_key, blk_idx = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
            blk_s = tl.max(tl.where(lane == blk_idx, s, neg_inf), axis=0)
            # strict >: on equal keys the earlier (smaller) token id stays
            better = blk_key > best_key
            best_key = tl.where(better, blk_key, best_key)
            best_tok = tl.where(better, start + blk_idx, best_tok)
            best_s = tl.where(better, blk_s, best_s)
            start += BLOCK
        return m, z, m_a, z_a, best_key, best_tok, best_s

    @triton.jit
    def _finish_row(
        row, m, z, m_a, z_a, best_tok, best_s, alpha, tok_ptr, logp_ptr, lnorm_ptr, UNIT_NORM: tl.constexpr
    ):
        """Turn a row's merged statistics into (token, log_p, log_norm); empty rows -> (0, -inf, -inf)."""
        neg_inf = float("-inf")
        empty = m_a == neg_inf
        # z, z_a >= 1 unless the row is empty; there a finite lse and log(1) keep the discarded math NaN-free
        lse = tl.where(empty, 0.0, m + tl.log(tl.where(empty, 1.0, z)))
        log_p = alpha * (best_s - lse)
        if UNIT_NORM:
            log_norm = tl.full([], 0.0, tl.float32)
        else:
            log_norm = alpha * (m_a - lse) + tl.log(tl.where(empty, 1.0, z_a))
        tl.store(tok_ptr + row, tl.where(empty, 0, best_tok).to(tl.int64))
        tl.store(logp_ptr + row, tl.where(empty, neg_inf, log_p))
        tl.store(lnorm_ptr + row, tl.where(empty, neg_inf, log_norm))

    @triton.jit
    def _sample_chunk_kernel(
        logits_ptr,
        stride_row,
        mask_ptr,
        stride_mask_row,
        seed_ptr,
        offset_ptr,
        part_ptr,
        part_tok_ptr,
        tok_ptr,
        logp_ptr,
        lnorm_ptr,
        V,
        chunk_len,
        n_chunks,
        scale,
        alpha,
        BLOCK: tl.constexpr,
        HAS_MASK: tl.constexpr,
        FINAL: tl.constexpr,
        UNIT_NORM: tl.constexpr,
    ):
        """Program (row, chunk): scan the chunk; write 7 partials, or the outputs when FINAL (one chunk)."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        v_lo = chunk * chunk_len
        v_hi = tl.minimum(v_lo + chunk_len, V)
        seed = tl.load(seed_ptr)
        counter_base = tl.load(offset_ptr) + row * V
        m, z, m_a, z_a, best_key, best_tok, best_s = _scan_chunk(
            logits_ptr + row * stride_row,
            mask_ptr + row * stride_mask_row,
            seed,
            counter_base,
            scale,
            alpha,
            v_lo,
            v_hi,
            BLOCK,
            HAS_MASK,
        )
        if FINAL:
            _finish_row(row, m, z, m_a, z_a, best_tok, best_s, alpha, tok_ptr, logp_ptr, lnorm_ptr, UNIT_NORM)
        else:
            # partials laid out [6, R, n_chunks] (floats) and [R, n_chunks] (token ids)
            plane = tl.num_programs(0) * n_chunks
            p = part_ptr + row * n_chunks + chunk
            tl.store(p, m)
            tl.store(p + plane, z)
            tl.store(p + 2 * plane, m_a)
            tl.store(p + 3 * plane, z_a)
            tl.store(p + 4 * plane, best_key)
            tl.store(p + 5 * plane, best_s)
            tl.store(part_tok_ptr + row * n_chunks + chunk, best_tok)

    @triton.jit
    def _sample_merge_kernel(
        part_ptr,
        part_tok_ptr,
        tok_ptr,
        logp_ptr,
        lnorm_ptr,
        n_rows,
        n_chunks,
        alpha,
        CHUNKS_P2: tl.constexpr,
        UNIT_NORM: tl.constexpr,
    ):
        """Program per row: merge the chunk partials (logsumexp rescaling, first best key) and finish."""
        neg_inf = float("-inf")
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_P2)
        valid = c < n_chunks
        plane = n_rows * n_chunks
        p = part_ptr + row * n_chunks + c
        m = tl.load(p, mask=valid, other=neg_inf)
        z = tl.load(p + plane, mask=valid, other=0.0)
        m_a = tl.load(p + 2 * plane, mask=valid, other=neg_inf)
        z_a = tl.load(p + 3 * plane, mask=valid, other=0.0)
        key = tl.load(p + 4 * plane, mask=valid, other=neg_inf)
        s_best = tl.load(p + 5 * plane, mask=valid, other=neg_inf)
        toks = tl.load(part_tok_ptr + row * n_chunks + c, mask=valid, other=0)

        m_all = tl.max(m, axis=0)
        shift = tl.where(m_all == neg_inf, 0.0, m_all)
        z_all = tl.sum(z * tl.exp(m - shift), axis=0)
        m_a_all = tl.max(m_a, axis=0)
        shift_a = tl.where(m_a_all == neg_inf, 0.0, m_a_all)
        z_a_all = tl.sum(z_a * tl.exp(alpha * (m_a - shift_a)), axis=0)
        # chunks are in token order, so the leftmost maximal chunk holds the smallest tied token
        _, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_tok = tl.sum(tl.where(c == best, toks, 0), axis=0)
        best_s = tl.max(tl.where(c == best, s_best, neg_inf), axis=0)
        _finish_row(
            row, m_all, z_all, m_a_all, z_a_all, best_tok, best_s, alpha, tok_ptr, logp_ptr, lnorm_ptr, UNIT_NORM
        )

    @triton.jit
    def _lse_chunk_kernel(
        logits_ptr,
        stride_r,
        stride_t,
        tokens_ptr,
        part_ptr,
        out_ptr,
        T,
        V,
        chunk_len,
        n_chunks,
        scale,
        alpha,
        BLOCK: tl.constexpr,
        FINAL: tl.constexpr,
    ):
        """Program (row = r*T + t, chunk): online logsumexp of the chunk; writes (m, z) or, if FINAL, the output."""
        neg_inf = float("-inf")
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        row_ptr = logits_ptr + (row // T) * stride_r + (row % T) * stride_t
        v_lo = chunk * chunk_len
        v_hi = tl.minimum(v_lo + chunk_len, V)
        m = tl.full([], neg_inf, tl.float32)
        z = tl.full([], 0.0, tl.float32)
        lane = tl.arange(0, BLOCK)
        start = v_lo
        while start < v_hi:  # not range(): see _scan_chunk
            cols = start + lane
            s = tl.load(row_ptr + cols, mask=cols < v_hi, other=neg_inf).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shift = tl.where(m_new == neg_inf, 0.0, m_new)
            z = z * tl.exp(m - shift) + tl.sum(tl.exp(s - shift), axis=0)
            m = m_new
            start += BLOCK
        if FINAL:
            _finish_logprob(row, row_ptr, tokens_ptr, out_ptr, m, z, V, scale, alpha)
        else:
            plane = tl.num_programs(0) * n_chunks
            tl.store(part_ptr + row * n_chunks + chunk, m)
            tl.store(part_ptr + plane + row * n_chunks + chunk, z)

    @triton.jit
    def _finish_logprob(row, row_ptr, tokens_ptr, out_ptr, m, z, V, scale, alpha):
        """out[row] = alpha * (s[token] - lse); an out-of-range token reads NaN instead of stray memory."""
        tok = tl.load(tokens_ptr + row)
        in_range = (tok >= 0) & (tok < V)
        s_tok = tl.load(row_ptr + tl.where(in_range, tok, 0), mask=in_range, other=float("nan"))
        s_tok = s_tok.to(tl.float32) * scale
        tl.store(out_ptr + row, alpha * (s_tok - (m + tl.log(z))))

    @triton.jit
    def _lse_merge_kernel(
        logits_ptr,
        stride_r,
        stride_t,
        tokens_ptr,
        part_ptr,
        out_ptr,
        n_rows,
        T,
        V,
        n_chunks,
        scale,
        alpha,
        CHUNKS_P2: tl.constexpr,
    ):
        """Program per row: merge the chunks' (m, z) and write alpha * (s[token] - lse)."""
        neg_inf = float("-inf")
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_P2)
        valid = c < n_chunks
        m = tl.load(part_ptr + row * n_chunks + c, mask=valid, other=neg_inf)
        z = tl.load(part_ptr + n_rows * n_chunks + row * n_chunks + c, mask=valid, other=0.0)
        m_all = tl.max(m, axis=0)
        shift = tl.where(m_all == neg_inf, 0.0, m_all)
        z_all = tl.sum(z * tl.exp(m - shift), axis=0)
        row_ptr = logits_ptr + (row // T) * stride_r + (row % T) * stride_t
        _finish_logprob(row, row_ptr, tokens_ptr, out_ptr, m_all, z_all, V, scale, alpha)


def _plan(
    n_rows: int,
    vocab: int,
    device: torch.device,
    block: int | None,
    n_chunks: int | None,
    gpu_block: int = 2048,
) -> tuple[int, int, int]:
    """(BLOCK, chunk_len, n_chunks) for a [n_rows, vocab] scan; see the module docstring.

    ``block``/``n_chunks`` override the defaults (tests use them to force ragged tails and the merge
    path). chunk_len is a whole number of blocks, so only the last chunk of a row is ragged.
    """
    if block is None:
        block = gpu_block if device.type == "cuda" else 1024
        block = min(block, max(16, triton.next_power_of_2(vocab)))
    n_blocks = triton.cdiv(vocab, block)
    if n_chunks is None:
        # ~4 programs per SM keeps every SM busy on the Philox work; the CPU interpreter runs programs
        # one by one, so a single chunk is fastest there
        target = 4 * sm_count(device) if device.type == "cuda" else 1
        n_chunks = triton.cdiv(target, max(n_rows, 1))
    n_chunks = max(1, min(n_chunks, n_blocks))
    blocks_per_chunk = triton.cdiv(n_blocks, n_chunks)
    n_chunks = triton.cdiv(n_blocks, blocks_per_chunk)
    return block, blocks_per_chunk * block, n_chunks


def _num_warps(block: int) -> int:
    """Warps per program: enough threads that each holds ~8 elements of a block."""
    return max(1, min(8, block // 256))


def fused_sample_triton(
    logits: Tensor,
    scale: float,
    alpha: float,
    seed: Tensor,
    offset: Tensor,
    allowed: Tensor | None = None,
    *,
    block: int | None = None,
    n_chunks: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton fused sampler (one pass over V per row, split over SMs for small R); see the module docstring.

    Same arguments and results as :func:`fused_sample_torch`; CUDA-graph safe (no host sync, seed and
    offset read on device). Uses ``R * V`` Philox numbers. ``block``, ``n_chunks`` and
    ``num_warps`` (keywords, for tests) override the launch plan, e.g. to force the chunk merge.
    """
    require_triton()
    _check_sample_args(logits, scale, alpha, allowed)
    _check_rng(seed, offset, logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    r, v = logits.shape
    dev = logits.device
    tokens = torch.empty(r, dtype=torch.int64, device=dev)
    log_p = torch.empty(r, dtype=torch.float32, device=dev)
    log_norm = torch.empty(r, dtype=torch.float32, device=dev)
    if r == 0:
        return tokens, log_p, log_norm
    block, chunk_len, n_chunks = _plan(r, v, dev, block, n_chunks)
    has_mask = allowed is not None
    if has_mask and allowed.stride(-1) != 1:
        allowed = allowed.contiguous()
    mask_arg = allowed if has_mask else tokens  # any pointer; never read without HAS_MASK
    mask_stride = allowed.stride(0) if has_mask else 0
    unit_norm = (not has_mask) and alpha == 1.0
    final = n_chunks == 1
    if final:
        part = torch.empty(1, dtype=torch.float32, device=dev)
        part_tok = torch.empty(1, dtype=torch.int32, device=dev)
    else:
        part = torch.empty(6, r, n_chunks, dtype=torch.float32, device=dev)
        part_tok = torch.empty(r, n_chunks, dtype=torch.int32, device=dev)
    _sample_chunk_kernel[(r, n_chunks)](
        logits,
        logits.stride(0),
        mask_arg,
        mask_stride,
        seed,
        offset,
        part,
        part_tok,
        tokens,
        log_p,
        log_norm,
        v,
        chunk_len,
        n_chunks,
        float(scale),
        float(alpha),
        BLOCK=block,
        HAS_MASK=has_mask,
        FINAL=final,
        UNIT_NORM=unit_norm,
        num_warps=num_warps or _num_warps(block),
    )
    if not final:
        _sample_merge_kernel[(r,)](
            part,
            part_tok,
            tokens,
            log_p,
            log_norm,
            r,
            n_chunks,
            float(alpha),
            CHUNKS_P2=triton.next_power_of_2(n_chunks),
            UNIT_NORM=unit_norm,
            num_warps=1,
        )
    return tokens, log_p, log_norm


def token_logprobs_triton(
    logits: Tensor,
    tokens: Tensor,
    scale: float,
    alpha: float,
    *,
    block: int | None = None,
    n_chunks: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Triton ``alpha * (s[tok] - logsumexp_v s)``, ``s = scale * logits``: one pass over V per (r, t).

    Same arguments and result as :func:`token_logprobs_torch`. Memory-bound; small R*T is split over
    V-chunks with a merge pass like :func:`fused_sample_triton`. Out-of-range tokens give NaN.
    ``block``, ``n_chunks`` and ``num_warps`` (keywords, for tests) override the launch plan.
    """
    require_triton()
    _check_logprob_args(logits, tokens, scale, alpha)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    r, t, v = logits.shape
    dev = logits.device
    out = torch.empty(r, t, dtype=torch.float32, device=dev)
    n_rows = r * t
    if n_rows == 0:
        return out
    tokens = tokens.to(torch.int64).contiguous()
    # memory-bound: bigger blocks keep more bytes in flight per program (measured on an H100)
    block, chunk_len, n_chunks = _plan(n_rows, v, dev, block, n_chunks, gpu_block=4096)
    final = n_chunks == 1
    part = torch.empty(1 if final else 2 * n_rows * n_chunks, dtype=torch.float32, device=dev)
    _lse_chunk_kernel[(n_rows, n_chunks)](
        logits,
        logits.stride(0),
        logits.stride(1),
        tokens,
        part,
        out,
        t,
        v,
        chunk_len,
        n_chunks,
        float(scale),
        float(alpha),
        BLOCK=block,
        FINAL=final,
        num_warps=num_warps or _num_warps(block),
    )
    if not final:
        _lse_merge_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            logits.stride(1),
            tokens,
            part,
            out,
            n_rows,
            t,
            v,
            n_chunks,
            float(scale),
            float(alpha),
            CHUNKS_P2=triton.next_power_of_2(n_chunks),
            num_warps=1,
        )
    return out


def fused_sample(
    logits: Tensor,
    scale: float,
    alpha: float,
    seed: Tensor,
    offset: Tensor,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample one token per row from the masked power distribution; see the module docstring.

    Dispatches to :func:`fused_sample_triton` on CUDA tensors, :func:`fused_sample_torch` otherwise.
    Returns ``(tokens [R] int64, log_p [R] f32, log_norm [R] f32)``; uses ``R * V`` Philox numbers.
    """
    fn = fused_sample_triton if use_triton(logits) else fused_sample_torch
    return fn(logits, scale, alpha, seed, offset, allowed)


def token_logprobs(logits: Tensor, tokens: Tensor, scale: float, alpha: float) -> Tensor:
    """``alpha * log_softmax(scale * logits)[tokens]`` as ``[R, T]`` float32 (the target's score of drafts).

    Dispatches to :func:`token_logprobs_triton` on CUDA tensors, :func:`token_logprobs_torch` otherwise.
    """
    fn = token_logprobs_triton if use_triton(logits) else token_logprobs_torch
    return fn(logits, tokens, scale, alpha)
