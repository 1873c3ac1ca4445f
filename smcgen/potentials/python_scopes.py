"""The scopes of a Python module as the undefined-name check sees them.

``bound_names`` lists what a scope binds (anywhere in it, its nested scopes excluded); ``Scope``
is one scope during the check's walk: what it binds anywhere, what is bound so far, and whether
more code may still join it. See ``python_names`` for the rules these feed.
"""

from __future__ import annotations

import ast

__all__ = ["Scope", "bound_names"]

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def bound_names(node: ast.AST) -> set[str]:
    """Names bound by the statements/expressions under ``node`` in ``node``'s own scope.

    Nested function, lambda and class bodies are skipped (their names are bound where they are
    defined); comprehension targets are skipped (their own scope) but a walrus inside binds here."""
    out: set[str] = set()

    def walk(n: ast.AST, in_comp: bool) -> None:
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)) and not in_comp:
            out.add(n.id)
        elif isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                out.add(a.asname or a.name.split(".")[0])
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out.update(n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name or isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            out.add(n.rest)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
            for part in [*n.decorator_list, *getattr(n, "bases", []), *[k.value for k in getattr(n, "keywords", [])]]:
                walk(part, in_comp)
            if not isinstance(n, ast.ClassDef):
                for d in [*n.args.defaults, *[d for d in n.args.kw_defaults if d is not None]]:
                    walk(d, in_comp)
            return
        if isinstance(n, ast.Lambda):
            for d in [*n.args.defaults, *[d for d in n.args.kw_defaults if d is not None]]:
                walk(d, in_comp)
            return
        comp = in_comp or isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp))
        for child in ast.iter_child_nodes(n):
            walk(child, comp)

    for child in ast.iter_child_nodes(node) if isinstance(node, (ast.Module, *_SCOPES)) else [node]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and child is node.args:
            continue
        if isinstance(node, _SCOPES) and child in getattr(node, "decorator_list", []):
            continue
        walk(child, False)
    return out


def _arg_names(args: ast.arguments) -> set[str]:
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return set(names)


class Scope:
    """One scope during the walk: what is bound so far, what is bound anywhere, and whether it may still grow."""

    def __init__(self, node: ast.AST, parent: Scope | None, is_open: bool):
        self.node = node
        self.parent = parent
        self.kind = (
            "module" if isinstance(node, ast.Module) else "class" if isinstance(node, ast.ClassDef) else "function"
        )
        self.all_bound = bound_names(node)
        self.before: set[str] = set()
        self.is_open = is_open
        self.loops: list[tuple[set[str], bool]] = []  # (names bound in the loop, loop may still grow)
        self.wildcard = any(
            isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(node)
        )
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self.before |= _arg_names(node.args)
            self.all_bound |= self.before
