"""One-off GPU diagnostic (session 14): fp32 prefill kernels; 200-prompt split with/without lookahead."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch
from embedded_pair import load_target
from fidelity import answer_each, chat_ids, summarize
from torch.profiler import ProfilerActivity, profile

import smcgen
from smcgen.api import load_draft
from smcgen.cli import DEFAULT_PROMPT
from smcgen.samplers.native import NativeSMC

OUT = os.environ.get("OUT", "/tmp")
part = sys.argv[1]
res = {}
if part in ("prefill", "all"):
    for dtype in (None, "bfloat16"):
        target = load_target("cuda", dtype, ["self-int8"])
        prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
        kw = dict(max_new_tokens=1, n_particles=1, target_temperature=0.7, seed=0)
        for _ in range(3):
            smcgen.generate(target, prompt, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            smcgen.generate(target, prompt, **kw)
            torch.cuda.synchronize()
        rows = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                r = rows.setdefault(e.name[:110], [0, 0.0])
                r[0] += 1
                r[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:15]
        total = sum(v[1] for v in rows.values())
        print(
            f"== prefill+1 step, target {dtype or 'fp32'}: kernels {sum(v[0] for v in rows.values())}, device {total / 1e3:.2f} ms",
            flush=True,
        )
        for name, (n, us) in top:
            print(f"  {us / 1e3:7.3f} ms  {n:5d}x  {us / max(n, 1):8.2f} us  {name}")
        res[f"prefill_{dtype or 'fp32'}"] = {"total_ms": total / 1e3, "top": [(n, c, us) for n, (c, us) in top]}
        del target
        smcgen.api.clear_engine_cache()
if part in ("sweep", "all"):
    n_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    qs = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "freshqa.jsonl"))][:n_prompts]
    target = load_target("cuda", None, ["self-int8"])
    draft = load_draft("self-int8", target, "cuda")
    prompts = [chat_ids(target.tokenizer, q) for q in qs]
    common = {"max_new_tokens": 64, "target_temperature": 0.7, "draft_temperature": 0.7}
    import smcgen.samplers.native as native_module

    orig = NativeSMC._looks_ahead
    rows = []
    smc = {"draft": draft, "n_particles": 2, "block_size": 8}
    for name, kw, ahead, kept_runs in [
        ("AR", {"n_particles": 1}, None, 3),
        ("2x8 default", smc, None, 3),
        ("2x8 lookahead on", smc, True, 3),
        ("2x8 lookahead on, one kept run (before)", smc, True, 1),
    ]:
        NativeSMC._looks_ahead = orig if ahead is None else (lambda self, on_gpu, a=ahead: a)
        native_module.KEPT_RUNS = kept_runs
        smcgen.api.clear_engine_cache()
        kw = {**common, **kw}
        smcgen.generate(target, prompts[0], seed=10_000, **kw)
        each = answer_each(target, prompts, 0.7, 0, **kw)
        s = summarize(each)
        s["name"] = name
        s["tokens"] = sum(a["length"] for a in each)
        rows.append(s)
        print(
            json.dumps(
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in s.items()
                    if not isinstance(v, (list, tuple))
                }
            ),
            flush=True,
        )
    NativeSMC._looks_ahead = orig
    res["sweep"] = rows
Path = __import__("pathlib").Path
Path(OUT, f"diag_{part}.json").write_text(json.dumps(res, indent=1, default=str))
