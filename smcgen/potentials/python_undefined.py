"""The static check behind ``PythonNamesPotential``: which name loads no binding can precede.

``undefined_names`` walks a module in evaluation order (``_Checker``), tracking each scope's
bindings (``python_scopes``); the rules it applies, and what it accepts as uncertain, are listed
in the docstring of ``smcgen.potentials.python_names``. An unfinished text is first cut back to
its complete statements and its open blocks closed (``_parse_prefix``); the scopes and loops that
contain its end count as still growing (``_open_nodes``).
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterable

from smcgen.potentials.python_scopes import Scope, bound_names

__all__ = ["undefined_names"]

_MODULE_NAMES = {
    "__name__",
    "__doc__",
    "__file__",
    "__builtins__",
    "__spec__",
    "__loader__",
    "__package__",
    "__annotations__",
    "__dict__",
    "__path__",
}
_BUILTINS = frozenset(dir(builtins))
_CLASS_NAMES = {"__module__", "__qualname__", "__class__"}


class _Checker(ast.NodeVisitor):
    """Walks a module in evaluation order and records loads that no binding can precede."""

    def __init__(self, open_nodes: set[int], known: set[str], module_grows: bool):
        self.open_nodes = open_nodes
        self.module_grows = module_grows
        self.known = known
        self.errors: list[tuple[str, int]] = []
        self.scope: Scope | None = None
        self.comp: list[set[str]] = []  # comprehension scopes in the current scope (innermost last)

    # ---------------------------------------------------------------- resolution
    def _resolves_outside(self, name: str, scope: Scope) -> bool:
        """Whether a name free in ``scope`` (a function) can resolve in an enclosing scope at call time."""
        s = scope.parent
        while s is not None:
            if s.kind == "class":  # class bodies are not visible from their methods
                s = s.parent
                continue
            if s.wildcard or name in s.all_bound or name in s.before or s.is_open and s.kind == "function":
                return True
            if s.kind == "module":
                return s.is_open and self.module_grows
            s = s.parent
        return False

    def _load(self, name: str, lineno: int) -> None:
        if any(name in c for c in self.comp):
            return
        s = self.scope
        assert s is not None
        if name in s.before or s.wildcard or name in self.known:
            return
        if any(name in bound or grows for bound, grows in s.loops):
            return
        if s.kind == "function":
            if name in s.all_bound:  # local everywhere in the function, not yet bound: UnboundLocalError
                self.errors.append((name, lineno))
                return
            if self._resolves_outside(name, s) or name in _BUILTINS:
                return
            self.errors.append((name, lineno))
            return
        # module or class level: locals fall back to globals and builtins
        if name in _BUILTINS or name in _MODULE_NAMES or s.kind == "class" and name in _CLASS_NAMES:
            return
        if s.kind == "class":
            outer = s.parent
            while outer is not None and outer.kind == "class":
                outer = outer.parent
            if outer is not None and (
                name in outer.before
                or outer.kind == "function"
                and (name in outer.all_bound or self._resolves_outside(name, outer))
            ):
                return
        self.errors.append((name, lineno))

    def _bind(self, name: str) -> None:
        if self.comp:
            self.comp[-1].add(name)
        else:
            assert self.scope is not None
            self.scope.before.add(name)

    # ---------------------------------------------------------------- scopes
    def visit_Module(self, node: ast.Module) -> None:
        self.scope = Scope(node, None, id(node) in self.open_nodes)
        for stmt in node.body:
            self.visit(stmt)

    def _in_scope(self, node: ast.AST, body: list[ast.AST]) -> None:
        saved, saved_comp = self.scope, self.comp
        self.scope, self.comp = Scope(node, saved, id(node) in self.open_nodes), []
        if isinstance(node, ast.ClassDef):
            self.scope.before.add("__class__")
        for stmt in body:
            self.visit(stmt)
        self.scope, self.comp = saved, saved_comp

    def _arguments(self, args: ast.arguments) -> None:
        for d in [*args.defaults, *[d for d in args.kw_defaults if d is not None]]:
            self.visit(d)
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None and a.annotation is not None:
                self.visit(a.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self._arguments(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        self._bind(node.name)
        self._in_scope(node, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._arguments(node.args)
        self._in_scope(node, [ast.Expr(node.body)])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in [*node.decorator_list, *node.bases, *[k.value for k in node.keywords]]:
            self.visit(part)
        self._in_scope(node, node.body)
        self._bind(node.name)

    def _comprehension(self, node: ast.AST, elts: list[ast.AST]) -> None:
        gens = node.generators  # type: ignore[attr-defined]
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        self.comp.append(set())
        for i, g in enumerate(gens):
            if i:
                self.visit(g.iter)
            self._store(g.target)
            for cond in g.ifs:
                self.visit(cond)
        for e in elts:
            self.visit(e)
        self.comp.pop()

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])

    # ---------------------------------------------------------------- statements in evaluation order
    def _store(self, target: ast.AST) -> None:
        """Visit an assignment target: loads inside it (a[i], a.b) first, then bind its names."""
        if isinstance(target, ast.Name):
            self._bind(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for e in target.elts:
                self._store(e)
        elif isinstance(target, ast.Starred):
            self._store(target.value)
        else:
            self.visit(target)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id, node.lineno)
        else:
            self._bind(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self._store(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id, node.lineno)
        self.visit(node.value)
        self._store(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        if self.scope is not None and self.scope.kind != "function":
            self.visit(node.annotation)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self._store(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        assert self.scope is not None
        self.scope.before.add(node.target.id)  # binds in the enclosing function, even from a comprehension

    def _loop(self, node: ast.AST, head: list[ast.AST], body: list[ast.AST], orelse: list[ast.AST]) -> None:
        assert self.scope is not None
        bound = set().union(*(bound_names(s) for s in [*head, *body]))
        self.scope.loops.append((bound, id(node) in self.open_nodes))
        for part in [*head, *body]:
            self.visit(part)
        self.scope.loops.pop()
        for s in orelse:
            self.visit(s)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        target = ast.Assign(targets=[node.target], value=ast.Constant(None), lineno=node.lineno)
        self._loop(node, [target], node.body, node.orelse)

    visit_AsyncFor = visit_For

    def visit_While(self, node: ast.While) -> None:
        self._loop(node, [ast.Expr(node.test)], node.body, node.orelse)

    def visit_With(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self._store(item.optional_vars)
        for s in node.body:
            self.visit(s)

    visit_AsyncWith = visit_With

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._bind(node.name)
        for s in node.body:
            self.visit(s)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for a in node.names:
            if a.name != "*":
                self._bind(a.asname or a.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        for n in node.names:
            self._bind(n)

    visit_Nonlocal = visit_Global

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._bind(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._bind(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        for k in node.keys:
            self.visit(k)
        for p in node.patterns:
            self.visit(p)
        if node.rest:
            self._bind(node.rest)


def _open_nodes(tree: ast.Module) -> set[int]:
    """Ids of the scopes and loops that contain the end of the text (more lines may join them)."""
    out = {id(tree)}
    node: ast.AST = tree
    while True:
        children = [c for f in ("body", "orelse", "handlers", "finalbody", "cases") for c in getattr(node, f, []) or []]
        if not children:
            return out
        node = max(children, key=lambda c: (c.lineno, c.col_offset))
        out.add(id(node))


def _parse_prefix(code: str) -> ast.Module | None:
    """The complete statements of ``code``, made parseable: an open block gets a ``pass``, an
    open ``try`` a ``finally``. Cuts back line by line (an unfinished statement) up to 8 lines."""
    lines = code.split("\n")[:-1]  # complete lines only
    for cut in range(len(lines), max(len(lines) - 8, 0) - 1, -1):
        text = "\n".join(lines[:cut]) + "\n"
        for fix in _fixes(lines[:cut]):
            try:
                return ast.parse(text + fix)
            except (SyntaxError, ValueError):
                continue
    return None


def _fixes(lines: list[str]) -> list[str]:
    """Candidate endings that close the open blocks of ``lines`` without binding or using a name."""
    code = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not code:
        return [""]
    last = code[-1]
    indent = len(last) - len(last.lstrip())
    out = [""]
    deeper = " " * (indent + 4) + "pass\n"
    if last.rstrip().endswith(":"):
        out.append(deeper)
    tries = sorted({len(ln) - len(ln.lstrip()) for ln in code if re.match(r"\s*try\s*:", ln)}, reverse=True)
    for i in tries:
        pad = " " * i
        for head in ("", deeper):
            out.append(head + pad + "finally:\n" + pad + "    pass\n")
    return out


def undefined_names(
    code: str, complete: bool = True, known_names: Iterable[str] = (), module_grows: bool = False
) -> list[tuple[str, int]] | None:
    """``(name, line)`` of each load that no binding can precede; None when the code does not parse.

    ``complete=False``: ``code`` is unfinished; its complete statements are checked and the scopes
    and loops that contain its end count as still growing (see the module docstring).
    ``module_grows``: module-level code may follow (then a function's names that are free
    everywhere are accepted until the text is complete: a later global may define them)."""
    if complete:
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            return None
        open_nodes: set[int] = set()
    else:
        tree = _parse_prefix(code)
        if tree is None:
            return None
        open_nodes = _open_nodes(tree)
    checker = _Checker(open_nodes, set(known_names), module_grows)
    checker.visit(tree)
    return checker.errors
