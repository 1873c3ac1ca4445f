"""Does a request draw the same tokens alone as inside a mixed batch, per resampler and cycle mode?

Continuous batching and mixed-length batches promise that a request's draws depend on its seed
alone, not on what else runs beside it. On the first GPU run this held for the fused systematic
resampler but not for the multinomial one (the torch resampling path). This script names the
piece: for each resampler (systematic, multinomial, stratified, residual), with the CUDA graph on
and off and the lookahead cycle on and off, it runs five prompts of different lengths, seeds and
limits as one batch on tiny fp32 models (the tests' models), then each prompt alone, and prints
which requests differ, and whether two identical solo runs agree with each other.

    python benchmarks/request_reproducibility.py --device cuda   # the GPU host
    python benchmarks/request_reproducibility.py                 # CPU: torch twins (no graph)

``--trace B`` instead follows request B through the torch resampling path (multinomial), in the
mixed batch and alone, with the graph on and off: per cycle, its weight increments, the uniforms it
drew, its Philox offset and the ancestors, so the first input that differs is named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from tiny_models import EOS, tiny_lm  # noqa: E402

from smcgen.core.config import SMCConfig  # noqa: E402
from smcgen.runners.native.model import NativeCausalLM  # noqa: E402
from smcgen.samplers.native import NativeSMC  # noqa: E402


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trace", type=int, default=None, help="follow this request's resampling inputs")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(0, logit_scale=1.0, hidden=32)
    nt, nd = NativeCausalLM.from_hf(target.model, device=dev), NativeCausalLM.from_hf(draft.model, device=dev)
    prompts = [_prompt(n, i) for i, n in enumerate([5, 2, 13, 7, 2])]
    seeds, limits = [3, 1, 4, 1, 5], [9, 6, 9, 3, 8]
    if args.trace is not None:
        trace(nt, nd, prompts, seeds, limits, args.trace, dev, args.out)
        return
    graphs = (True, False) if dev.type == "cuda" else (False,)
    rows = []
    for resampler in ("systematic", "multinomial", "stratified", "residual"):
        for graph in graphs:
            for ahead in (True, False):
                cfg = SMCConfig(
                    n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9, resampler=resampler
                )
                engine = NativeSMC(nt, cfg, draft=nd, eos_token_ids=(EOS,), page_size=4, cuda_graph=graph)
                engine.lookahead = ahead
                mixed = engine.run(prompts, on_dead="flag", seeds=seeds, max_new_tokens=limits)
                differ, first = [], None
                for b in range(len(prompts)):
                    alone = engine.run([prompts[b]], on_dead="flag", seeds=[seeds[b]], max_new_tokens=[limits[b]])
                    if not torch.equal(mixed.tokens[b, :, : limits[b]], alone.tokens[0]):
                        differ.append(b)
                        if first is None:
                            first = {
                                "mixed": mixed.tokens[b, :, : limits[b]].tolist(),
                                "alone": alone.tokens[0].tolist(),
                                "mixed_resampled": mixed.resampled[:, b].tolist(),
                                "alone_resampled": alone.resampled[:, 0].tolist(),
                            }
                again = [engine.run([prompts[1]], on_dead="flag", seeds=[1], max_new_tokens=[6]) for _ in range(2)]
                row = {
                    "resampler": resampler,
                    "cuda_graph": graph,
                    "lookahead": ahead,
                    "requests_that_differ": differ,
                    "solo_runs_agree": torch.equal(again[0].tokens, again[1].tokens),
                    "first_difference": first,
                }
                rows.append(row)
                print(
                    f"{resampler:12s} graph={graph!s:5s} lookahead={ahead!s:5s} differ={differ} "
                    f"solo runs agree={row['solo_runs_agree']}",
                    flush=True,
                )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "request_reproducibility.json"), "w") as f:
            json.dump({"device": str(dev), "rows": rows}, f, indent=1)


def trace(nt, nd, prompts, seeds, limits, b: int, dev: torch.device, out: str | None) -> None:
    """Per cycle, request ``b``'s inputs and outputs of the torch resampling step (see the docstring).

    Wraps two engine internals (the torch resampling step and its uniform source) to keep
    references to their tensors; under a CUDA graph those are the graph's static outputs, read
    after each replay through ``on_cycle``."""
    from smcgen.samplers import native_cycle, native_state

    key = (seeds[b], len(prompts[b]))  # a segment is known by its seed and prompt length here
    seen: dict = {}
    current: list = [None]
    uniform, resample = native_state._PhiloxUniforms.uniform, native_cycle.CycleSteps._torch_resample

    def traced_uniform(self, shape):
        start = self.offset.clone()  # the counter the uniforms are drawn from (uniform advances it)
        u = uniform(self, shape)
        if current[0] == key:
            seen.update(u=u, offset=start)
        return u

    def traced_resample(self, s, i, inc):
        g = s.segments[i]
        current[0] = (g.seed, g.prompt_len)
        anc, ess, want = resample(self, s, i, inc)
        if current[0] == key:
            seen.update(inc=inc, anc=anc, want=want, ess=ess)
        return anc, ess, want

    native_state._PhiloxUniforms.uniform = traced_uniform
    native_cycle.CycleSteps._torch_resample = traced_resample
    report = {}
    for graph in (True, False) if dev.type == "cuda" else (False,):
        for which in ("mixed", "alone"):
            cfg = SMCConfig(
                n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9, resampler="multinomial"
            )
            engine = NativeSMC(nt, cfg, draft=nd, eos_token_ids=(EOS,), page_size=4, cuda_graph=graph)
            cycles: list = []

            def on_cycle(tokens, lengths, log_w, cycles=cycles):
                cycles.append({k: v.detach().double().cpu().flatten().tolist() for k, v in seen.items()})

            seen.clear()
            if which == "mixed":
                run = engine.run(prompts, on_dead="flag", seeds=seeds, max_new_tokens=limits, on_cycle=on_cycle)
                tokens = run.tokens[b, :, : limits[b]].tolist()
            else:
                run = engine.run(
                    [prompts[b]], on_dead="flag", seeds=[seeds[b]], max_new_tokens=[limits[b]], on_cycle=on_cycle
                )
                tokens = run.tokens[0].tolist()
            name = f"graph={graph} {which}"
            report[name] = {"tokens": tokens, "cycles": cycles}
            print(name, tokens)
            for c, row in enumerate(cycles):
                print(f"  cycle {c}: " + "; ".join(f"{k} {[round(x, 5) for x in v]}" for k, v in row.items()))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "request_trace.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
