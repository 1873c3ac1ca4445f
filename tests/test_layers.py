"""No module of smcgen imports from a higher layer (docs/architecture.md, "Layers").

Every ``import`` / ``from ... import`` in smcgen/ is read with ``ast`` (module level and inside
functions, relative imports resolved; imports under ``if TYPE_CHECKING:`` are skipped: they never
run). Each module is given a layer by the longest matching prefix in ``LAYERS``; a module no
prefix matches fails the test, so a new module has to be placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smcgen"

# Lowest first. A module may import its own layer and any layer below it.
LAYERS: list[tuple[str, list[str]]] = [
    # the math every layer shares (smcgen/core: settings, sampling and resampling primitives that the
    # kernels' torch twins reuse, result records), prompt handling, grammar text
    ("primitives", ["smcgen.core", "smcgen.prompts", "smcgen.grammars", "smcgen.trace", "smcgen.streaming"]),
    ("kernels", ["smcgen.kernels"]),
    # model runners: a forward pass and its KV cache, no SMC (the transformers runner, the native
    # model and its paged cache, the embedded model's files)
    ("runners", ["smcgen.runners", "smcgen.models"]),
    # the factors of the target and the proposals; exact enumeration and the property checks are
    # built on the factors alone
    ("potentials, proposals", ["smcgen.potentials", "smcgen.proposals", "smcgen.exact", "smcgen.testing"]),
    ("step", ["smcgen.samplers.step", "smcgen.samplers.run", "smcgen.samplers.cycle"]),
    # the samplers drive the step over a runner; outcome turns a dead-particle error into a result
    ("samplers", ["smcgen.samplers"]),
    # what users call: the package, generate(), input checks, memory estimates, distill, CLI, server
    (
        "interface",
        [
            "smcgen",
            "smcgen.__main__",
            "smcgen.api",
            "smcgen.validation",
            "smcgen.memory",
            "smcgen.distill",
            "smcgen.distill_samples",
            "smcgen.cli",
            "smcgen.engine",
            "smcgen.engine_build",
            "smcgen.engine_requests",
            "smcgen.engine_results",
            "smcgen.engine_stream",
            "smcgen.continuous",
            "smcgen.server",
        ],
    ),
]

# Upward imports that are allowed, with the reason. Empty today; add (importer, imported, why).
ALLOWED: list[tuple[str, str, str]] = []


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the bare package name covers smcgen/__init__.py only, not every module below it
            covers = module == prefix or (prefix != "smcgen" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def smcgen_imports(source: str, module: str, is_package: bool) -> set[str]:
    """The smcgen modules (or names in them) that ``source`` imports at run time."""
    tree = ast.parse(source)
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "smcgen")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "smcgen":
                continue
            # `from smcgen.x import y` may name a submodule y: judge the most specific module
            found.update(
                f"{target}.{a.name}"
                if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()
                else target
                for a in node.names
            )
    return found


def upward_imports(module: str, imports: set[str]) -> list[str]:
    mine = layer_of(module)
    allowed = {(a, b) for a, b, _ in ALLOWED}
    return [
        f"{module} ({LAYERS[mine][0]}) imports {imp} ({LAYERS[layer_of(imp)][0]})"
        for imp in sorted(imports)
        if layer_of(imp) > mine and (module, imp) not in allowed
    ]


def all_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer():
    for module, _ in all_modules():
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    problems = []
    for module, path in all_modules():
        problems += upward_imports(module, smcgen_imports(path.read_text(), module, path.name == "__init__.py"))
    assert not problems, "imports from a higher layer:\n" + "\n".join(problems)


def test_the_check_sees_an_upward_import():
    """The checker itself: a potential importing an engine (also lazily, or relatively) is caught."""
    source = "import torch\nfrom smcgen.samplers.generic import SMC\ndef f():\n    from ..api import generate\n"
    found = smcgen_imports(source, "smcgen.potentials.reward", is_package=False)
    assert found == {"smcgen.samplers.generic", "smcgen.api"}
    assert len(upward_imports("smcgen.potentials.reward", found)) == 2
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from smcgen.samplers.generic import SMC\n"
    assert smcgen_imports(hidden, "smcgen.potentials.reward", is_package=False) == set()
    with pytest.raises(LookupError, match="smcgen.elsewhere"):
        layer_of("smcgen.elsewhere")
