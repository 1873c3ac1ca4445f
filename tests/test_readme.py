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
