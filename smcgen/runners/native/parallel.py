"""Tensor parallelism for the native decoder over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU).

One process per device; each holds a ``TensorParallelLM``, the same ``NativeCausalLM`` code path
with a rank's share of every layer (Megatron's split):

- QKV and gate/up are *column*-parallel: a rank keeps ``n_heads / tp`` query heads and
  ``n_kv_heads / tp`` KV heads (its rows of q, k and v), and ``intermediate / tp`` rows of the gate
  and of the up projection. Attention, RoPE and the paged KV cache then run unchanged on the
  rank's heads: the cache is split by KV heads (``make_cache`` sizes it with the local count).
- o and down are *row*-parallel (a rank keeps the input columns matching its heads / its MLP
  rows): their partial products are summed by one all-reduce each. Rank 0 adds the residual and
  the bias in the fused kernel's epilogue and the others add nothing, so the all-reduce's sum is
  the new residual stream on every rank: no extra kernel, two all-reduces per layer.
- The LM head is *vocabulary*-parallel (a contiguous slice of the rows per rank), and the logits
  stay sharded: :func:`sharded_sample` and :func:`sharded_token_logprobs` reduce per-row
  statistics (log-sum-exp, the best Gumbel key and its token) with one small all-gather, never the
  full logits. The Gumbel noise of token v is Philox counter ``offset + r * V + v`` with the
  *global* V and v, the same numbers the single-process sampler uses, so the token drawn is the
  one process's token up to the logits' rounding.
- The embedding, the norms and the draft model are replicated.

Everything after the target's logits (draft steps, weights, resampling, page bookkeeping) runs
replicated on every rank from identical inputs and identical Philox seeds, so the ranks stay in
lock step without communicating: the engine (``NativeSMC``) is used as it is, with a
``TensorParallelLM`` as its target. Collectives are captured by CUDA graphs on NCCL.

Start one process per device with ``torchrun --nproc-per-node=TP script.py`` (then
:func:`init_tensor_parallel` in the script) or, from Python, :func:`spawn`. Design notes:
docs/tensor_parallel.md.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smcgen.core.sampling import allowed_from_bitmask, gumbel_from_uniform
from smcgen.kernels.philox import philox_uniform
from smcgen.runners.native.model import NativeCausalLM, NativeConfig

__all__ = [
    "TensorParallelLM",
    "init_tensor_parallel",
    "sharded_sample",
    "sharded_token_logprobs",
    "spawn",
    "vocab_range",
]


# ------------------------------------------------------------------------------------ process setup


def init_tensor_parallel(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` (or :func:`spawn`) describes in the environment.

    Returns ``(rank, world_size, device)``: the rank's GPU (``LOCAL_RANK``, made current) with NCCL
    when CUDA is present, else the CPU with gloo. ``backend`` overrides the choice. Idempotent.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "init_tensor_parallel: RANK / WORLD_SIZE are not set; start the script with "
            "`torchrun --nproc-per-node=<TP> script.py` or call smcgen.runners.native.parallel.spawn"
        )
    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    init_tensor_parallel("gloo" if not torch.cuda.is_available() else None)
    try:
        out = fn(*args)
        if rank == 0:
            # as bytes: tensors put on the queue as they are would share memory with a process that exits
            buf = io.BytesIO()
            torch.save(out, buf)
            queue.put(buf.getvalue())
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> Any:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined as one group; return rank 0's result.

    The library's launcher for Python callers (tests, notebooks): each process sets the torchrun
    environment, calls :func:`init_tensor_parallel` (gloo on a CPU-only host), runs ``fn`` and
    leaves the group. ``fn`` and its arguments must be picklable (a module-level function).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _spawned, args=(world_size, _free_port(), fn, args, queue), nprocs=world_size, start_method="spawn", join=True
    )
    return torch.load(io.BytesIO(queue.get()), weights_only=False)


# --------------------------------------------------------------------------------- the model shard


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of the LM head (tokens) rank ``rank`` of ``world`` holds: contiguous,
    sizes differing by at most one (any vocabulary size splits)."""
    base, extra = divmod(vocab_size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _local_config(cfg: NativeConfig, world: int) -> NativeConfig:
    """A rank's share of the architecture: heads and MLP rows divided by ``world`` (vocabulary kept:
    the engine and the sampler count tokens globally; only the LM head's rows are split)."""
    for name, value in (
        ("num_attention_heads", cfg.n_heads),
        ("num_key_value_heads", cfg.n_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {name} ({value}) divisible by {world}")
    return dataclasses.replace(
        cfg,
        n_heads=cfg.n_heads // world,
        n_kv_heads=cfg.n_kv_heads // world,
        intermediate_size=cfg.intermediate_size // world,
    )


class TensorParallelLM(NativeCausalLM):
    """One rank's shard of a ``NativeCausalLM`` (see the module docstring); a drop-in target for ``NativeSMC``.

    Build it with :meth:`from_native` (slice a full model every rank holds, e.g. in tests),
    ``from_config`` (random weights drawn per rank, for benchmarks) or
    ``runners.native.build.random_layerwise``. ``cfg`` holds the *local* head and MLP counts;
    ``vocab_size`` stays global, and ``forward`` returns the rank's logits columns
    ``[vocab_lo, vocab_hi)``. ``group`` defaults to the whole world.
    """

    def __init__(
        self,
        cfg: NativeConfig,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        max_positions: int | None = None,
        *,
        group: Any = None,
    ):
        if not dist.is_initialized():
            raise RuntimeError("TensorParallelLM needs torch.distributed initialized (see init_tensor_parallel)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        super().__init__(_local_config(cfg, world), dtype, device, max_positions)
        self.group, self.rank, self.world = group, rank, world
        self.full_config = cfg
        self.vocab_lo, self.vocab_hi = vocab_range(cfg.vocab_size, rank, world)
        # the head's rows of this rank only (unties a tied head: the embedding stays whole)
        self.lm_head = nn.Parameter(
            torch.empty(self.vocab_hi - self.vocab_lo, cfg.hidden_size, dtype=dtype, device=self.embed.device),
            requires_grad=False,
        )

    @classmethod
    @torch.no_grad()
    def from_native(cls, full: NativeCausalLM, *, group: Any = None) -> TensorParallelLM:
        """This rank's shard of ``full`` (same weights, same layout, quantized ones with their scales:
        a row scale of o / down covers the whole row, so each shard of the row keeps it)."""
        if isinstance(full, TensorParallelLM):
            raise ValueError("from_native takes a whole NativeCausalLM, not a shard")
        cfg = full.cfg
        shard = cls(cfg, full.dtype, full.device, full.max_positions, group=group)
        w, r = shard.world, shard.rank
        d, hq, hkv, inter = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
        q_rows = _block(hq * d, r, w)
        k_rows = _block(hkv * d, r, w, start=hq * d)
        v_rows = _block(hkv * d, r, w, start=(hq + hkv) * d)
        qkv_rows = torch.cat([q_rows, k_rows, v_rows])
        gate_up_rows = torch.cat([_block(inter, r, w), _block(inter, r, w, start=inter)])
        rules = {  # name -> (rows kept, columns kept) of the full tensor; None keeps all
            "qkv": (qkv_rows, None),
            "qkv_bias": (qkv_rows, None),
            "qkv_scale": (qkv_rows, None),
            "o": (None, q_rows),
            "gate_up": (gate_up_rows, None),
            "gate_up_bias": (gate_up_rows, None),
            "gate_up_scale": (gate_up_rows, None),
            "down": (None, _block(inter, r, w)),
        }
        for mine, theirs in zip(shard.layers, full.layers, strict=True):
            for name, tensor in list(theirs.named_parameters(recurse=False)) + list(
                theirs.named_buffers(recurse=False)
            ):
                rows, cols = rules.get(name, (None, None))
                t = tensor if rows is None else tensor.index_select(0, rows.to(tensor.device))
                t = t if cols is None else t.index_select(1, cols.to(tensor.device))
                _assign(mine, name, t.contiguous(), isinstance(tensor, nn.Parameter))
        shard.embed.copy_(full.embed)
        shard.norm.copy_(full.norm)
        _assign(shard, "lm_head", full.lm_head[shard.vocab_lo : shard.vocab_hi].contiguous(), True)
        head_scale = getattr(full, "lm_head_scale", None)
        if head_scale is not None:
            _assign(shard, "lm_head_scale", head_scale[shard.vocab_lo : shard.vocab_hi].contiguous(), False)
        shard.input_norm_folded = full.input_norm_folded
        for knob in ("skinny_max_rows", "skinny_qkv", "skinny_head", "fused_qkv_rope", "pdl", "residual_in_place"):
            setattr(shard, knob, getattr(full, knob))
        return shard.eval()

    # ------------------------------------------------------------------------------- the hooks

    def _add_projection(
        self,
        linear: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor,
        accumulate: bool,
        weight_scale: Tensor | None,
    ) -> Tensor:
        """Row-parallel projection: rank 0 adds residual and bias in the kernel's epilogue, the sum
        over ranks (one all-reduce, in place) is then ``residual + x @ W.T + bias`` on every rank."""
        if self.rank == 0:
            out = linear(x, weight, bias, residual=residual, accumulate=accumulate, weight_scale=weight_scale)
        else:
            out = linear(x, weight, None, weight_scale=weight_scale)
        dist.all_reduce(out, group=self.group)
        return out

    def sample(
        self, logits: Tensor, scale: float, alpha: float, seed: Tensor, offset: Tensor, allowed: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`sharded_sample` over this rank's logits columns."""
        return sharded_sample(logits, self.vocab_lo, self.vocab_size, scale, alpha, seed, offset, allowed, self.group)

    def token_logprobs(self, logits: Tensor, tokens: Tensor, scale: float, alpha: float) -> Tensor:
        """:func:`sharded_token_logprobs` over this rank's logits columns."""
        return sharded_token_logprobs(logits, tokens, self.vocab_lo, scale, alpha, self.group)

    def gather_logits(self, logits: Tensor) -> Tensor:
        """The full logits ``[..., V]`` from every rank's columns (for tests and inspection only:
        the engine never needs them)."""
        parts = [
            torch.empty(*logits.shape[:-1], hi - lo, dtype=logits.dtype, device=logits.device)
            for lo, hi in (vocab_range(self.vocab_size, r, self.world) for r in range(self.world))
        ]
        # uneven shards: all_gather takes equal sizes, so pad to the widest and cut
        width = max(p.shape[-1] for p in parts)
        padded = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]))
        got = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(got, padded.contiguous(), group=self.group)
        return torch.cat([g[..., : p.shape[-1]] for g, p in zip(got, parts)], dim=-1)


def _block(n: int, rank: int, world: int, start: int = 0) -> Tensor:
    """Indices of rank ``rank``'s equal block of ``n`` (``n % world == 0``), shifted by ``start``."""
    size = n // world
    return torch.arange(start + rank * size, start + (rank + 1) * size)


def _assign(module: nn.Module, name: str, value: Tensor, parameter: bool) -> None:
    """Set a parameter / buffer to ``value`` (its dtype may differ: quantized weights)."""
    if parameter:
        setattr(module, name, nn.Parameter(value, requires_grad=False))
    else:
        module.register_buffer(name, value)


# ------------------------------------------------------------------------ sampling over vocab shards


def _gather_rows(stats: Tensor, group: Any) -> Tensor:
    """``[world, *stats.shape]``: every rank's ``stats`` (rank order), the same on every rank."""
    world = dist.get_world_size(group)
    out = torch.empty(world, *stats.shape, dtype=stats.dtype, device=stats.device)
    if stats.device.type == "cuda":
        dist.all_gather_into_tensor(out, stats.contiguous(), group=group)
    else:  # gloo: the list form
        dist.all_gather(list(out.unbind(0)), stats.contiguous(), group=group)
    return out


def sharded_sample(
    logits: Tensor,
    vocab_lo: int,
    vocab_size: int,
    scale: float,
    alpha: float,
    seed: Tensor,
    offset: Tensor,
    allowed: Tensor | None = None,
    group: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``kernels.sampling.fused_sample`` when each rank holds logits columns ``[vocab_lo, vocab_lo + V_r)``.

    Same contract and results (up to rounding of the log-normalizers): the Gumbel key of global
    token v uses Philox counter ``offset + r * vocab_size + v``, candidates and the unit norm at
    alpha = 1 without a mask follow the module docstring of ``kernels.sampling``. Each rank
    reduces its columns to four numbers per row (log-sum-exp of ``s``, log-sum-exp of ``alpha*s``
    over its candidates, its best key and that token's ``s``) plus the token; one all-gather of
    ``[R, 5]`` and the same merge on every rank (ties to the lowest rank, i.e. the smallest id)
    give every rank the same token, ``log_p`` and ``log_norm``. ``allowed``: the full-vocabulary bitmask.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [R, V_shard], got {tuple(logits.shape)}")
    if not scale > 0 or not alpha > 0:
        raise ValueError(f"scale and alpha must be positive, got scale={scale}, alpha={alpha}")
    neg_inf = float("-inf")
    r, width = logits.shape
    dev = logits.device
    s = logits.float() * scale
    ok = s > neg_inf
    if allowed is not None:
        ok &= allowed_from_bitmask(allowed, vocab_size, dev)[:, vocab_lo : vocab_lo + width]
    cols = torch.arange(vocab_lo, vocab_lo + width, device=dev, dtype=torch.int64)
    rows = torch.arange(r, device=dev, dtype=torch.int64)
    counters = offset.reshape(1, 1) + rows[:, None] * vocab_size + cols[None, :]
    key = torch.where(ok, alpha * s + gumbel_from_uniform(philox_uniform(seed.reshape(1, 1), counters)), neg_inf)
    best_key, best = key.max(dim=-1)  # first maximum: the smallest token id on ties
    local = torch.stack(
        [
            torch.logsumexp(s, dim=-1),
            torch.logsumexp(torch.where(ok, alpha * s, neg_inf), dim=-1),
            best_key,
            s.gather(-1, best[:, None]).squeeze(-1),
            (best + vocab_lo).float(),  # token ids < 2**24 are exact in float32
        ],
        dim=-1,
    )
    every = _gather_rows(local, group)  # [world, R, 5]
    lse = torch.logsumexp(every[..., 0], dim=0)
    cand = torch.logsumexp(every[..., 1], dim=0)
    winner = every[..., 2].argmax(dim=0, keepdim=True)  # first maximum: the lowest rank
    best_s = every[..., 3].gather(0, winner).squeeze(0)
    tokens = every[..., 4].gather(0, winner).squeeze(0).long()
    log_p = alpha * (best_s - lse)
    if allowed is None and alpha == 1.0:
        log_norm = torch.zeros(r, dtype=torch.float32, device=dev)
    else:
        log_norm = cand - alpha * lse
    nonempty = cand > neg_inf
    return (
        torch.where(nonempty, tokens, 0),
        torch.where(nonempty, log_p, neg_inf),
        torch.where(nonempty, log_norm, neg_inf),
    )


def sharded_token_logprobs(
    logits: Tensor, tokens: Tensor, vocab_lo: int, scale: float, alpha: float, group: Any = None
) -> Tensor:
    """``kernels.sampling.token_logprobs`` (``alpha * log_softmax(scale * logits)[tokens]``, ``[R, T]``)
    when each rank holds logits columns ``[vocab_lo, vocab_lo + V_r)``: each rank gives its columns'
    log-sum-exp and the token's scaled logit where it owns the token (0 elsewhere); one all-gather
    of ``[R, T, 2]`` and the same sum on every rank."""
    if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"need logits [R, T, V_shard] and tokens [R, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    s = logits.float() * scale
    local_ids = tokens.long() - vocab_lo
    mine = (local_ids >= 0) & (local_ids < s.shape[-1])
    s_tok = s.gather(-1, local_ids.clamp(0, s.shape[-1] - 1)[..., None]).squeeze(-1)
    local = torch.stack([torch.logsumexp(s, dim=-1), torch.where(mine, s_tok, 0.0)], dim=-1)
    every = _gather_rows(local, group)  # [world, R, T, 2]
    # one owner per token: the sum of the others' zeros is exact
    return alpha * (every[..., 1].sum(dim=0) - torch.logsumexp(every[..., 0], dim=0))
