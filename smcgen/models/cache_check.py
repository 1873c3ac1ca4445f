"""Self-checking model cache: checksums of a converted model directory, verified cheaply on load.

At conversion every file's size and SHA-256 go into ``smcgen_checksums.json``. On load each file's
size is compared, and its hash recomputed only when its modification time differs from the one
recorded when it was last verified (a 540 MB weights file hashes in about half a second, once;
later loads cost a ``stat`` per file). A cache converted before checksums existed is checked for
structure (the JSON files parse, the safetensors header matches the file size) and then trusted:
its checksums are recorded from then on, so later damage is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

CHECKSUMS_FILE = "smcgen_checksums.json"
# files that are not part of the model (written by smcgen itself)
_OWN_FILES = ("smcgen_provenance.json", CHECKSUMS_FILE)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name not in _OWN_FILES)


def _write_json_atomic(path: Path, data: dict) -> None:
    # a concurrent reader sees the old file or the new one, never a half-written one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_checksums(directory: Path) -> dict:
    """Hash every model file of ``directory`` and write ``smcgen_checksums.json``; returns its content."""
    files = {}
    for p in _model_files(directory):
        st = p.stat()
        files[p.name] = {"size": st.st_size, "sha256": file_sha256(p), "verified_mtime_ns": st.st_mtime_ns}
    data = {"files": files}
    _write_json_atomic(directory / CHECKSUMS_FILE, data)
    return data


def structure_problem(directory: Path) -> str | None:
    """Why a converted directory cannot be a sound model (unparsable JSON, truncated safetensors), or None."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        p = directory / name
        if not p.is_file():
            if name in ("config.json", "tokenizer.json"):
                return f"{name} is missing"
            continue
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return f"{name} is not valid JSON ({err})"
    for p in directory.glob("*.safetensors"):
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{p.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{p.name} is truncated (header of {n} bytes in a {size}-byte file)"
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                return f"{p.name} has a damaged header"
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            return f"{p.name} is truncated or padded: the header describes {8 + n + max(ends, default=0)} bytes, the file has {size}"
    return None


def verify_cache(directory: Path) -> str | None:
    """Why ``directory`` does not hold the files its checksums describe (None when it does).

    Cheap when nothing changed: sizes and modification times are compared, and a file is hashed
    only when its modification time differs from the last verification. A directory without
    checksums is checked for structure and, when sound, gets its checksums recorded."""
    record_path = directory / CHECKSUMS_FILE
    try:
        data = json.loads(record_path.read_text())
        files = data["files"]
    except FileNotFoundError:
        problem = structure_problem(directory)
        if problem is None:
            try:
                record_checksums(directory)
            except OSError:
                pass  # a read-only cache stays unrecorded; it was checked for structure
        return problem
    except (ValueError, KeyError, TypeError):
        return f"{CHECKSUMS_FILE} is damaged"
    changed = False
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        st = p.stat()
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, {want['size']} were written"
        if st.st_mtime_ns == want.get("verified_mtime_ns"):
            continue
        if file_sha256(p) != want["sha256"]:
            return f"{name} changed since it was written (SHA-256 mismatch)"
        want["verified_mtime_ns"] = st.st_mtime_ns
        changed = True
    if changed:
        try:
            _write_json_atomic(record_path, data)
        except OSError:
            pass  # verification still holds; it is only redone next time
    return None


__all__ = ["CHECKSUMS_FILE", "file_sha256", "record_checksums", "structure_problem", "verify_cache"]
