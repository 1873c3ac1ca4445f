"""Where a host-guided cycle's time goes: the host's work, its waits and each captured piece on the GPU.

A guide whose masks come from the CPU (JSON with strings, a CFG, a regex with its automaton hidden)
runs the native cycle as captured pieces with the host between them
(smcgen/samplers/native_host_guide.py). ``guide_speed.py`` measures the result (tokens/s against the
unguided whole-cycle graph); this script says why. It wraps the pieces' methods of one run and
records, per cycle after the warm-up:

- host milliseconds in ``_host_mask`` (the guide's masks and their copy), in ``_wait`` (blocked on
  the device), in launching each piece (``_run``: a graph replay) and the rest (reorder, history);
- device milliseconds of each piece (CUDA events around each replay) and the sum of them, against
  the wall time of the cycle: the difference is the time the GPU sat idle waiting for the host.

Same models and synthetic 128,256-token vocabulary as ``guide_speed.py`` (random Llama-3.1-8B
target, Llama-3.2-1B draft, SMC-SD N=8 K=8). ``--trace`` also writes a Chrome trace of two cycles.

    python benchmarks/host_guide_profile.py --out $OUT          # GPU host
    python benchmarks/host_guide_profile.py --tiny              # CPU smoke test (no device times)
"""

# ruff: noqa: C408
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch
from architectures import TINY_LLAMA, build_llama
from guide_speed import DRAFT, EOS, TARGET, synthetic_tokenizer
from host_mask_step import guide

import smcgen
from smcgen.runners.transformers import LanguageModel
from smcgen.samplers.native_host_guide import HostGuidedCycle


class Probe:
    """Wraps HostGuidedCycle's host-side methods of every run while active; one record per cycle."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.cycles: list[dict] = []
        self._cur: dict = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._orig = {n: getattr(HostGuidedCycle, n) for n in ("_host_mask", "_wait", "_run", "_cycle")}
        self.trace_cycles: tuple[int, int] | None = None

    def __enter__(self) -> Probe:
        probe, orig = self, self._orig

        def host_mask(cyc, host_tokens):
            t0 = time.perf_counter()
            orig["_host_mask"](cyc, host_tokens)
            probe._cur["host_mask_ms"] += 1e3 * (time.perf_counter() - t0)

        def wait(cyc):
            t0 = time.perf_counter()
            orig["_wait"](cyc)
            probe._cur["wait_ms"] += 1e3 * (time.perf_counter() - t0)

        def run(cyc, name, piece, *args):
            t0 = time.perf_counter()
            if probe.cuda and cyc.graphs is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                orig["_run"](cyc, name, piece, *args)
                end.record()
                probe._events.append((name, start, end))
            else:
                orig["_run"](cyc, name, piece, *args)
            probe._cur["launch_ms"] += 1e3 * (time.perf_counter() - t0)

        def cycle(cyc):
            captured = cyc.graphs is not None
            if probe.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            orig["_cycle"](cyc)
            if probe.cuda:
                torch.cuda.synchronize()
            rec = dict(probe._cur)
            rec["wall_ms"] = 1e3 * (time.perf_counter() - t0)
            rec["captured"] = captured
            rec["other_host_ms"] = rec["wall_ms"] - sum(
                rec.get(k, 0.0) for k in ("host_mask_ms", "wait_ms", "launch_ms")
            )
            gpu = defaultdict(float)
            for name, start, end in probe._events:
                gpu[name.rstrip("0123456789") or name] += start.elapsed_time(end)
            rec["gpu_ms"] = dict(gpu)
            rec["gpu_busy_ms"] = sum(gpu.values())
            probe.cycles.append(rec)
            probe._cur = defaultdict(float)
            probe._events = []

        HostGuidedCycle._host_mask, HostGuidedCycle._wait = host_mask, wait
        HostGuidedCycle._run, HostGuidedCycle._cycle = run, cycle
        return self

    def __exit__(self, *exc) -> None:
        for n, f in self._orig.items():
            setattr(HostGuidedCycle, n, f)

    def summary(self) -> dict:
        """Medians over the captured cycles (the warm-up's eager cycle left out)."""
        steady = [c for c in self.cycles if c["captured"]] or self.cycles
        keys = ("wall_ms", "host_mask_ms", "wait_ms", "launch_ms", "other_host_ms", "gpu_busy_ms")
        out = {k: round(statistics.median(c.get(k, 0.0) for c in steady), 3) for k in keys}
        names = sorted({n for c in steady for n in c["gpu_ms"]})
        out["gpu_ms_by_piece"] = {
            n: round(statistics.median(c["gpu_ms"].get(n, 0.0) for c in steady), 3) for n in names
        }
        out["gpu_idle_ms"] = round(out["wall_ms"] - out["gpu_busy_ms"], 3) if self.cuda else None
        out["cycles"] = len(steady)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--guides", default="regex,json,cfg")
    ap.add_argument("--trace", action="store_true", help="write a Chrome trace of two regex cycles")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    new_tokens = args.new_tokens or (63 if args.tiny else 512)
    prompt_len = 8 if args.tiny else 64
    tok = synthetic_tokenizer(2048 if args.tiny else 128256)
    vocab, max_pos = len(tok), prompt_len + new_tokens + 64
    lms = [
        LanguageModel(
            build_llama(TINY_LLAMA if args.tiny else cfg, dtype, device, seed, vocab_size=vocab,
                        max_position_embeddings=max_pos, bos_token_id=0, eos_token_id=EOS),
            tok, (EOS,), max_pos,
        )
        for cfg, seed in ((TARGET, 0), (DRAFT, 1))
    ]  # fmt: skip
    target_lm, draft_lm = lms
    prompt = torch.randint(2, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    sd = dict(target=target_lm, draft=draft_lm, prompt=prompt, n_particles=8, block_size=8,
              max_new_tokens=new_tokens, engine="native", on_dead="flag")  # fmt: skip

    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d")}
    smcgen.generate(**sd, seed=1)  # the unguided baseline's capture
    t0 = time.perf_counter()
    base = smcgen.generate(**sd, seed=1)
    timing = smcgen.api.cached_engine(target_lm, draft=draft_lm, engine="native")._native.most_recent().last_timing
    report["unguided"] = {
        "cycle_ms": round(1e3 * timing["decode_s"] / max(timing["cycles"], 1), 3),
        "tok_s": round(len(base.token_ids) / (time.perf_counter() - t0), 1),
    }
    print(json.dumps(report), flush=True)
    for name in args.guides.split(","):
        g = guide(name, target_lm)
        smcgen.generate(**sd, guide=g, seed=1)  # warm: compiles, first captures
        with Probe(cuda) as probe:
            out = smcgen.generate(**sd, guide=g, seed=1)
        row = probe.summary()
        row.update(tokens=len(out.token_ids), engine_reason=out.engine_reason)
        if cuda:
            row["vs_unguided_cycle"] = round(report["unguided"]["cycle_ms"] / row["wall_ms"], 3)
        report[name] = row
        print(json.dumps({name: row}), flush=True)
    if args.trace and cuda:
        from torch.profiler import ProfilerActivity, profile

        g = guide("regex", target_lm)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            smcgen.generate(**{**sd, "max_new_tokens": 27}, guide=g, seed=1)
        prof.export_chrome_trace(os.path.join(args.out, "host_guide_trace.json"))
        report["trace_top"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(report["trace_top"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_guide_profile.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
