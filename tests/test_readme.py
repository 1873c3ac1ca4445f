"""The README's code must stay valid, and its custom potential must work as shown."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

import smcgen

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_compile():
    blocks = python_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        compile(code, "README.md", "exec")


def test_readme_custom_potential_scores_as_documented():
    code = next(b for b in python_blocks() if "class NoDigits" in b)
    namespace: dict = {}
    # run only the class definition (the generate call needs the embedded model)
    exec(code.split("short =")[0], namespace)
    batch = smcgen.SequenceBatch([[1], [2]], [0], decoder=None)
    batch.__dict__["texts"] = ["no digits here", "one 1"]
    scores = namespace["NoDigits"]().log_prefix(batch)
    assert scores[0] == 0.0 and scores[1] == -math.inf
    assert isinstance(scores, torch.Tensor)
    assert len(code.split("class NoDigits")[1].split("short =")[0].strip().splitlines()) < 15


def test_readme_testing_harness_runs_on_the_custom_potential():
    """The smcgen.testing block, run after the custom potential's class, passes on it (embedded tokenizer)."""
    blocks = python_blocks()
    potential_code = next(b for b in blocks if "class NoDigits" in b).split("short =")[0]
    harness_code = next(b for b in blocks if "smcgen.testing" in b)
    namespace: dict = {}
    exec(potential_code + harness_code, namespace)  # runs check_potential on the README's sequences
    tok = namespace["tok"]
    case = namespace["TestNoDigits"]()
    assert all(isinstance(t, int) and t != tok.unk_token_id for t in case.tokens)
    case.max_examples = 8
    for prop in ("values_finite_or_neginf", "batch_scores_as_rows_alone", "deterministic", "monotone_where_claimed"):
        getattr(case, f"test_{prop}")()


ROOT = README.parent
LINKED_DOCS = [README, ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_resolves_inside_the_repository():
    """The README, BENCHMARKS.md, CONTRIBUTING.md and docs/ link only to files (and headings) in the repository."""
    broken = []
    for doc in LINKED_DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            if ROOT not in path.parents and path != ROOT:
                broken.append(f"{doc.name}: {target} (outside the repository)")
            elif not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 260
