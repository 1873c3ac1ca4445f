"""How much real Python the grammar of smcgen.grammars.python accepts: the function bodies of the
standard library's pure-Python modules, as written and after ``ast.unparse``.

Each function (methods included; its ``def`` line dedented to column 0) gives one body: the text
after the colon that ends its header, starting with that line's newline, which is what
``python_grammar(start="body")`` generates after a prompt that ends with the ``def`` line. One-line
functions (``def f(): return 1``) have no such body and are counted apart. Bodies are fed to an
xgrammar matcher character by character (``accept_string``: the grammar compiled for a byte-level
vocabulary, so no tokenizer is involved) or, with ``--tokens``, token by token with the embedded
model's tokenizer. The grammar is compiled lazily (no mask is needed to match, so none is built;
``--eager`` precompiles them all, minutes for 49,152 tokens). A body is accepted when
the matcher takes all of it and may end there. Rejects are listed by construct: the type of the
innermost AST node at the first rejected character.

    python benchmarks/python_grammar_coverage.py [--limit 3000] [--tokens] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import collections
import io
import json
import os
import random
import sys
import sysconfig
import textwrap
import time
import tokenize
from pathlib import Path

import xgrammar as xgr
from tqdm import tqdm

from smcgen.grammars.python import python_grammar


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def header_end(lines: list[str]) -> int | None:
    """Index of the line whose ':' closes the def header (bracket depth 0), or None."""
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if tok.type == tokenize.OP:
                if tok.string in "([{":
                    depth += 1
                elif tok.string in ")]}":
                    depth -= 1
                elif tok.string == ":" and depth == 0:
                    return tok.start[0] - 1
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return None


def bodies(path: Path) -> tuple[list[tuple[str, str, int]], int]:
    """(label, body as written, offset) and (label, unparsed body) pairs of a file; and one-liner count."""
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src)
    lines = src.splitlines()
    out, one_liners = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        seg = lines[node.lineno - 1 : node.end_lineno]
        col = node.col_offset
        seg = [ln[min(col, len(ln) - len(ln.lstrip(" \t"))) :] for ln in seg]
        end = header_end(seg)
        if end is None or node.body[0].lineno - node.lineno <= end:
            one_liners += 1
            continue
        label = f"{path.name}:{node.lineno}"
        out.append((label + " written", "\n" + "\n".join(seg[end + 1 :]) + "\n"))
        unparsed = ast.unparse(node)
        start = unparsed.index("def ")
        out.append((label + " unparse", unparsed[unparsed.index("\n", start) :] + "\n"))
    return out, one_liners


def construct_at(body: str, pos: int) -> str:
    """The innermost AST node type at character ``pos`` of ``body`` (parsed inside a dummy def)."""
    code = "def _f():" + body
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "?"
    prefix = code[: pos + len("def _f():")]
    line, col = prefix.count("\n") + 1, len(prefix) - (prefix.rfind("\n") + 1)
    best, size = "?", None
    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or node.end_lineno is None or isinstance(node, ast.FunctionDef):
            continue
        start, end = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
        if start <= (line, col) < end or start <= (line, col) <= end and not best:
            extent = (end[0] - start[0]) * 1000 + end[1] - start[1]
            if size is None or extent < size:
                best, size = type(node).__name__, extent
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=3000, help="functions sampled (0: all)")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--tokens", action="store_true", help="feed SmolLM2 tokens instead of characters")
    ap.add_argument("--eager", action="store_true", help="precompile every mask entry (minutes with --tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/python_grammar_coverage"))
    ap.add_argument("--show", type=int, default=3, help="examples printed per reject construct")
    args = ap.parse_args()

    files = stdlib_files()
    pairs: list[tuple[str, str]] = []
    one_liners = 0
    for f in tqdm(files, desc="extracting", file=sys.stderr):
        try:
            got, ones = bodies(f)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        pairs += got
        one_liners += ones
    functions = sorted({label.rsplit(" ", 1)[0] for label, _ in pairs})
    if args.limit and len(functions) > args.limit:
        keep = set(random.Random(args.seed).sample(functions, args.limit))
        pairs = [p for p in pairs if p[0].rsplit(" ", 1)[0] in keep]

    src = python_grammar(depth=args.depth, start="body", fence=False)
    t0 = time.perf_counter()
    if args.tokens:
        import smcgen

        lm = smcgen.load_model("smollm2-135m", "cpu")
        tok = lm.tokenizer
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=lm.vocab_size)
    else:
        tok = None
        info = xgr.TokenizerInfo([chr(i) for i in range(128)])
    # matching needs no masks: the lazy compile (PythonGrammarPotential's) builds none of them
    compiler = xgr.GrammarCompiler(info, max_threads=2, enable_dynamic_compilation=not args.eager)
    compiled = compiler.compile_grammar(xgr.Grammar.from_ebnf(src))
    compile_s = time.perf_counter() - t0

    results = {"written": [0, 0], "unparse": [0, 0]}
    rejects: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    t0 = time.perf_counter()
    for label, body in tqdm(pairs, desc="matching", file=sys.stderr):
        kind = label.rsplit(" ", 1)[1]
        m = xgr.GrammarMatcher(compiled)
        pos = len(body)
        if tok is None:
            for i, ch in enumerate(body):
                if not m.accept_string(ch):
                    pos = i
                    break
        else:
            done = 0
            for t in tok.encode(body, add_special_tokens=False):
                if not m.accept_token(t):
                    pos = done
                    break
                done += len(tok.decode([t]))
        ok = pos == len(body) and m.is_completed()
        results[kind][0] += ok
        results[kind][1] += 1
        if not ok:
            where = min(pos, len(body) - 1)
            line = body[: where + 1].split("\n")[-1] + "⟂" + body[where + 1 :].split("\n")[0]
            rejects[construct_at(body, where) if pos < len(body) else "(end)"].append((label, line.strip()))
    match_s = time.perf_counter() - t0

    n_chars = sum(len(b) for _, b in pairs)
    summary = {
        "python": sys.version.split()[0],
        "files": len(files),
        "bodies": {k: {"accepted": a, "total": n, "rate": a / n if n else None} for k, (a, n) in results.items()},
        "one_line_functions_skipped": one_liners,
        "feed": "tokens (SmolLM2)" if tok is not None else "characters",
        "depth": args.depth,
        "compile": "eager" if args.eager else "lazy",
        "compile_s": compile_s,
        "match_us_per_char": 1e6 * match_s / max(n_chars, 1),
        "rejects": {k: len(v) for k, v in sorted(rejects.items(), key=lambda kv: -len(kv[1]))},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "rejects.json").write_text(json.dumps(rejects, indent=1))
    for construct, items in sorted(rejects.items(), key=lambda kv: -len(kv[1])):
        print(f"\n{construct}: {len(items)}")
        for label, line in items[: args.show]:
            print(f"    {label}: {textwrap.shorten(line, 110)}")
    print()
    print(
        f"| bodies | accepted | total | rate |  (feed: {summary['feed']}, Python {summary['python']}, "
        f"{len(files)} files, depth {args.depth}, {summary['compile']} compile {compile_s:.2f} s)"
    )
    print("|---|---|---|---|")
    for k, (a, n) in results.items():
        print(f"| {k} | {a} | {n} | {a / max(n, 1):.2%} |")


if __name__ == "__main__":
    main()
