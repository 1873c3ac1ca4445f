"""Finishing inside the token budget: dead-at-limit rate and validity with SmolLM2-135M (CPU).

Twenty function-calling style schema tasks (``TASKS``: tool arguments and records with free-text
fields, where the model likes to write long strings). For each task and method one run of one
group: plain masking (N=1) and SMC N=4, 8 with and without the budget twist
(``GrammarPotential.finish_within``), all at one ``max_new_tokens``. Valid = the answer (one
particle drawn by weight) passes ``jsonschema``; dead = every particle had weight zero (at the
length limit inside the JSON).

    OMP_NUM_THREADS=2 python benchmarks/json_budget_eval.py --max-new-tokens 48 [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from smcgen import SMC, GrammarPotential, LMPotential, SMCConfig
from smcgen.api import load_model
from smcgen.potentials.json_schema import SchemaWarning


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


S = {"type": "string"}
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "weather": ("the weather in Paris", obj({"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}})),
    "email": ("an email to a colleague about a delayed meeting", obj({"to": S, "subject": S, "body": S})),
    "person": (
        "a fictional person",
        obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": S}),
    ),
    "book": ("a book you like", obj({"title": S, "author": S, "year": {"type": "integer"}})),
    "todo": ("a to-do item", obj({"task": S, "done": {"type": "boolean"}, "priority": {"enum": ["low", "high"]}})),
    "search": (
        "a web search for cheap flights",
        obj({"query": S, "limit": {"type": "integer", "minimum": 1, "maximum": 20}}),
    ),
    "recipe": (
        "a simple recipe",
        obj({"name": S, "ingredients": {"type": "array", "items": S, "minItems": 1}, "minutes": {"type": "integer"}}),
    ),
    "event": ("a calendar event", obj({"title": S, "date": S, "location": S})),
    "product": (
        "a product listing",
        obj({"name": S, "price": {"type": "number", "minimum": 0}, "tags": {"type": "array", "items": S}}),
    ),
    "review": (
        "a short movie review",
        obj({"movie": S, "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "text": S}),
    ),
    "address": ("a postal address", obj({"street": S, "city": S, "zip": S, "country": S})),
    "translate": (
        "a request to translate a greeting to French",
        obj({"text": S, "target": {"enum": ["fr", "de", "es"]}}),
    ),
    "ticket": (
        "a bug report",
        obj({"title": S, "severity": {"enum": ["low", "medium", "high"]}, "steps": {"type": "array", "items": S}}),
    ),
    "song": ("a song", obj({"title": S, "artist": S, "genre": S})),
    "city": ("facts about a city", obj({"name": S, "country": S, "population": {"type": "integer", "minimum": 0}})),
    "order": ("a pizza order", obj({"item": S, "size": {"enum": ["small", "large"]}, "notes": S})),
    "contact": ("a contact card", obj({"name": S, "phone": S, "email": S})),
    "summary": ("a summary of a news story", obj({"headline": S, "summary": S})),
    "pet": ("a pet", obj({"name": S, "species": S, "age": {"type": "integer", "minimum": 0}})),
    "note": (
        "a note with a title and two lines",
        obj({"title": S, "lines": {"type": "array", "items": S, "minItems": 2, "maxItems": 2}}),
    ),
}
METHODS = {
    "masking": (1, False),
    "smc4": (4, False),
    "smc4+twist": (4, True),
    "smc8": (8, False),
    "smc8+twist": (8, True),
}


def prompt_ids(lm: Any, what: str, schema: dict[str, Any]) -> list[int]:
    messages = [
        {
            "role": "user",
            "content": f"Write {what} as one JSON object valid against this JSON schema:\n" + json.dumps(schema),
        }
    ]
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write json_budget_eval.json here")
    args = ap.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; allowed: {list(METHODS)}")
    tasks = {k: TASKS[k] for k in (args.tasks.split(",") if args.tasks else TASKS)}

    lm = load_model("smollm2-135m", "cpu")
    rows = []
    for name, (what, schema) in tqdm(tasks.items(), desc="tasks"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SchemaWarning)
            g = GrammarPotential.json_schema(schema).bind(lm)
        ids = prompt_ids(lm, what, schema)
        for m in methods:
            n, twist = METHODS[m]
            g.finish_within = args.max_new_tokens if twist else None
            cfg = SMCConfig(n_particles=n, max_new_tokens=args.max_new_tokens, target_temperature=1.0, seed=args.seed)
            t0 = time.perf_counter()
            run = SMC(LMPotential(lm), cfg, mask=g).run(ids, n_groups=1, on_dead="flag")
            dt = time.perf_counter() - t0
            dead = bool(run.dead[0])
            valid = False
            text = ""
            if not dead:
                w = run.log_weights[0].exp()
                i = int(torch.multinomial(w / w.sum(), 1, generator=torch.Generator().manual_seed(args.seed)))
                text = g._text(run.tokens[0, i, : int(run.lengths[0, i])].tolist())
                valid = g.schema.violation(text) is None
            rows.append({"task": name, "method": m, "valid": valid, "dead": dead, "seconds": dt, "text": text})
            tqdm.write(f"{name} | {m} | valid {valid} | dead {dead} | {dt:.1f} s | {text[:70]!r}")
        g.finish_within = None

    print(
        f"\nmax_new_tokens={args.max_new_tokens}, {len(tasks)} tasks, one run each, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| method | valid | dead at the limit | seconds per run |")
    print("|---|---:|---:|---:|")
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        print(
            f"| {m} | {sum(r['valid'] for r in rs)}/{len(rs)} | {sum(r['dead'] for r in rs)}/{len(rs)} | "
            f"{sum(r['seconds'] for r in rs) / len(rs):.1f} |"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "json_budget_eval.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
