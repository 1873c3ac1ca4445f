"""``smcgen`` command line: the main job (SMC speculative decoding on the embedded model),
``smcgen distill`` and ``smcgen serve MODEL`` (the OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import sys
import time

from pydantic import ValidationError

from smcgen.core.config import SMCConfig

DEFAULT_PROMPT = "Write a short poem about the sea."


#: (particles, block size) of the main job with the self-int8 draft: on the 2-core CPU the fastest
#: setting whose mean ESS/N stayed above 0.5; on an H100 the same setting kept the target's quality
#: on 200 prompts (BENCHMARKS.md, "CPU main job" and "The self-int8 draft on a GPU: a fair AR")
MAIN_JOB = (2, 8)


def main_job_draft(draft: str) -> str:
    """The draft ``--draft auto`` stands for: the target's own weights in int8 (``self-int8``) on
    every device. It is the one embedded draft whose answers match the target's within noise (CPU
    and H100, 200 prompts); the shipped 2-layer draft's text leans toward the draft's."""
    if draft != "auto":
        return draft
    from smcgen.models.self_draft import SELF_INT8_DRAFT

    return SELF_INT8_DRAFT


def main_job_setting(draft_name: str) -> tuple[int, int]:
    """(particles, block size) the main job runs with this draft: ``MAIN_JOB`` with the self-int8
    draft, else :class:`SMCConfig`'s defaults."""
    from smcgen.models.self_draft import SELF_INT8_DRAFT

    d = SMCConfig()
    return MAIN_JOB if draft_name == SELF_INT8_DRAFT else (d.n_particles, d.block_size)


def build_parser() -> argparse.ArgumentParser:
    """Options of the main job; defaults come from :class:`SMCConfig` where they exist."""
    d = SMCConfig()
    p = argparse.ArgumentParser(
        prog="smcgen",
        description="SMC speculative decoding: a draft proposes blocks, the target weights them, "
        "particles resample when the ESS drops. Defaults run the embedded SmolLM2-135M-Instruct "
        "with an int8 copy of itself as the draft, offline after the first run.",
        epilog="Other commands: `smcgen distill --help` (train a draft for a target) and `smcgen serve --help` "
        "(an OpenAI-compatible HTTP server).",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (the chat template is applied)")
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    p.add_argument("--target", default="smollm2-135m", help="target model name or path")
    p.add_argument(
        "--draft",
        default="auto",
        help="draft model name or path; 'none' for plain SMC; 'self-int8': the target with int8 weights; 'auto' "
        "(default): self-int8; 'smollm2-135m-draft': the shipped 2-layer draft (its text leans toward the draft's)",
    )
    p.add_argument(
        "--draft-dtype",
        default="auto",
        help="run a copy of the draft in this dtype, e.g. bfloat16; 'auto' (default): bfloat16 on a CPU with "
        "native bf16 (AVX512-BF16 or AMX), else as loaded; 'none': as loaded. The self-int8 draft's int8 "
        "layers stay int8",
    )
    p.add_argument(
        "-n",
        "--n-particles",
        type=int,
        default=None,
        help=f"particles (default: {MAIN_JOB[0]} with the self-int8 draft, else {d.n_particles})",
    )
    p.add_argument(
        "-k",
        "--block-size",
        type=int,
        default=None,
        help=f"drafted tokens per block (default: {MAIN_JOB[1]} with the self-int8 draft, else {d.block_size})",
    )
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ess-threshold", type=float, default=d.ess_threshold)
    p.add_argument("--resampler", default=d.resampler)
    p.add_argument("--draft-temperature", type=float, default=0.7)
    p.add_argument("--target-temperature", type=float, default=0.7)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--engine", default=d.engine, help="auto (native on a GPU when supported), native or generic")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--regex", default=None, help="constrain the output to this regular expression")
    out.add_argument(
        "--json-schema", metavar="FILE", default=None, help="constrain the output to JSON under this schema"
    )
    out.add_argument(
        "--grammar",
        metavar="FILE",
        default=None,
        help="constrain the output to this grammar: Lark syntax for a .lark file, else xgrammar EBNF",
    )
    return p


def build_distill_parser() -> argparse.ArgumentParser:
    """Options of ``smcgen distill``; defaults come from :class:`smcgen.distill.DistillConfig`."""
    from smcgen.distill import DistillConfig

    d = DistillConfig()
    p = argparse.ArgumentParser(
        prog="smcgen distill",
        description="Train a small draft for a target on the target's samples (optionally its own too; by "
        "default the mean of both KL directions to the target's next-token distributions); the draft shares the target's "
        "embedding and head. Writes draft.safetensors, "
        "config.json and manifest.json that `smcgen --draft OUT` and generate(draft=OUT) load.",
    )
    p.add_argument("--target", default="smollm2-135m", help="target model name or path")
    p.add_argument("--out", required=True, help="output directory (also holds checkpoint.pt, loss.csv and loss.png)")
    p.add_argument("--layers", type=int, default=None, help="draft decoder layers (default: chosen from the target)")
    p.add_argument("--init", default=d.init, choices=["spaced", "first", "last"], help="target layers copied in")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps")
    p.add_argument("--minutes", type=float, default=None, help="training time budget")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=d.sample_batch, help="target samples per sampling round")
    p.add_argument("--reuse", type=int, default=d.reuse, help="optimiser steps each sample serves")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length of each target sample")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="sampling temperature the draft is for (target samples and KL are tempered alike)",
    )
    p.add_argument(
        "--divergence",
        default=d.divergence,
        choices=["forward", "reverse", "symmetric"],
        help="what the draft minimises at each position: KL(target || draft), KL(draft || target) or their mean",
    )
    p.add_argument(
        "--on-policy",
        type=float,
        default=d.on_policy,
        help="share (0..1) of sampling rounds the draft samples itself, so it learns on its own continuations",
    )
    p.add_argument("--init-from", default=None, help="a trained draft directory to start from (its layers)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    p.add_argument("--corpus", default=None, help="text file whose paragraphs add prompts")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def distill_main(argv: list[str]) -> int:
    """``smcgen distill``: train a draft and print where it went and its held-out figures."""
    from smcgen.api import load_model
    from smcgen.distill import distill

    args = build_distill_parser().parse_args(argv)
    if args.steps is None and args.minutes is None:
        print("smcgen distill: give --steps and/or --minutes", file=sys.stderr)
        return 2
    target = load_model(args.target, args.device)
    try:
        distill(
            target,
            args.out,
            target_name=args.target,
            layers=args.layers,
            init=args.init,
            steps=args.steps,
            minutes=args.minutes,
            batch_size=args.batch_size,
            micro_batch=args.micro_batch,
            sample_batch=args.sample_batch,
            reuse=args.reuse,
            max_new_tokens=args.max_new_tokens,
            lr=args.lr,
            temperature=args.temperature,
            divergence=args.divergence,
            on_policy=args.on_policy,
            init_from=args.init_from,
            seed=args.seed,
            eval_sequences=args.eval_sequences,
            checkpoint_minutes=args.checkpoint_minutes,
            corpus=args.corpus,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"smcgen distill: {err}", file=sys.stderr)
        return 2
    return 0


def device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used here (unknown name, or CUDA asked for but absent), else None."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a device name; use cpu or cuda (cuda:0, ...)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        return f"--device {device}: CUDA is not available ({why}); use --device cpu"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def grammar_from_args(args: argparse.Namespace):
    """The GrammarPotential that --regex / --json-schema / --grammar ask for (None when none is given)."""
    import json
    from pathlib import Path

    from smcgen.potentials.grammar import GrammarPotential

    if args.regex is not None:
        return GrammarPotential.regex(args.regex)
    if args.json_schema is not None:
        return GrammarPotential.json_schema(json.loads(Path(args.json_schema).read_text()))
    if args.grammar is not None:
        text = Path(args.grammar).read_text()
        return GrammarPotential.lark(text) if args.grammar.endswith(".lark") else GrammarPotential.ebnf(text)
    return None


def build_serve_parser() -> argparse.ArgumentParser:
    """Options of ``smcgen serve``: the model, its draft, the address and the defaults of every request."""
    d = SMCConfig()
    p = argparse.ArgumentParser(
        prog="smcgen serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/health, /metrics). SMC settings of a request are extra body fields; the options below are the defaults.",
    )
    p.add_argument("model", help="target model name or path (e.g. smollm2-135m)")
    p.add_argument("--draft", default=None, help="draft model name or path (SMC speculative decoding)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as model (default: MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-n", "--n-particles", type=int, default=d.n_particles)
    p.add_argument("-k", "--block-size", type=int, default=d.block_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--engine", default=d.engine, help="auto, native or generic")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond that, 503")
    p.add_argument("--max-batch", type=int, default=8, help="requests handed to the engine at once at most")
    p.add_argument("--log-level", default="info")
    return p


def serve_main(argv: list[str]) -> int:
    """``smcgen serve``: load the model once and serve it with uvicorn until interrupted."""
    from pydantic import ValidationError

    args = build_serve_parser().parse_args(argv)
    problem = device_problem(args.device)
    if problem is not None:
        print(f"smcgen serve: {problem}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from smcgen.server import create_app
    except ImportError as err:
        print(f"smcgen serve needs the server extra: pip install 'smcgen[server]' ({err})", file=sys.stderr)
        return 2
    from smcgen.api import load_draft, load_model
    from smcgen.engine import Engine

    try:
        config = SMCConfig(
            n_particles=args.n_particles,
            block_size=args.block_size,
            max_new_tokens=args.max_new_tokens,
            engine=args.engine,
        )
    except ValidationError as err:
        print(f"smcgen serve: invalid option: {err}", file=sys.stderr)
        return 2
    target = load_model(args.model, args.device)
    draft = load_draft(args.draft, target, args.device) if args.draft else None
    engine = Engine(target, draft=draft, config=config)
    app = create_app(engine, args.served_model_name or args.model, max_queue=args.max_queue, max_batch=args.max_batch)
    print(
        f"smcgen serve: {args.model} ({'native' if engine.engine_reason is None else 'generic'} engine"
        f"{'' if engine.engine_reason is None else ': ' + engine.engine_reason}) on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the main job; any error prints its message and exits with status 2 (``--debug``: traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["distill"]:
        return distill_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("smcgen: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the library's errors carry their own explanation
        if args.debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"smcgen: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


def option_errors(err: ValidationError) -> str:
    """A config ``ValidationError`` in the CLI's terms: each problem named by its flag (``-n/--n-particles``),
    not the config field it sets."""
    flags = {a.dest: "/".join(a.option_strings) for a in build_parser()._actions if a.option_strings}
    return "; ".join(
        f"{flags.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'options'}: {e['msg']}" for e in err.errors()
    )


def run(args: argparse.Namespace) -> int:
    """The main job for parsed options: print the text, particle count, ESS summary and timing."""
    import smcgen
    from smcgen.api import load_draft, load_model
    from smcgen.runners.transformers import auto_draft_dtype

    problem = device_problem(args.device)
    if problem is not None:
        print(f"smcgen: error: {problem}", file=sys.stderr)
        return 2
    try:
        grammar = grammar_from_args(args)
    except (OSError, ValueError) as err:
        print(f"smcgen: invalid output constraint: {err}", file=sys.stderr)
        return 2
    draft_name = main_job_draft(args.draft)
    n, k = main_job_setting(draft_name)
    try:
        config = SMCConfig(
            n_particles=n if args.n_particles is None else args.n_particles,
            block_size=k if args.block_size is None else args.block_size,
            max_new_tokens=args.max_new_tokens,
            ess_threshold=args.ess_threshold,
            resampler=args.resampler,
            draft_temperature=args.draft_temperature,
            target_temperature=args.target_temperature,
            alpha=args.alpha,
            seed=args.seed,
            engine=args.engine,
        )
    except ValidationError as err:
        print(f"smcgen: invalid option: {option_errors(err)}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    target = load_model(args.target, args.device)
    draft = load_draft(draft_name, target, args.device)
    draft_dtype = args.draft_dtype
    if draft is not None and draft_dtype == "auto":
        draft_dtype = auto_draft_dtype(draft)
    if draft is not None and draft_dtype and draft_dtype.lower() != "none":
        try:
            draft = draft.to_dtype(draft_dtype)
        except ValueError as err:
            print(f"smcgen: invalid option --draft-dtype: {err}", file=sys.stderr)
            return 2
    load_s = time.perf_counter() - t0

    if args.raw or target.tokenizer is None or not getattr(target.tokenizer, "chat_template", None):
        prompt: str | list[dict[str, str]] = args.prompt
    else:
        prompt = [{"role": "user", "content": args.prompt}]  # generate applies the chat template
    result = smcgen.generate(target, prompt, draft=draft, config=config, grammar=grammar, progress=not args.no_progress)

    mode = f"SMC-SD (draft {draft_name}, K={config.block_size})" if draft is not None else "plain SMC"
    print(f"== {mode} on {args.target}, device {target.device}")
    print(f"prompt: {args.prompt}")
    print("-- generated text " + "-" * 40)
    print(result.text)
    print("-" * 58)
    print(result.summary())
    if result.parsed is not None:
        print(f"parsed: {result.parsed!r}")
    print(f"model load: {load_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
