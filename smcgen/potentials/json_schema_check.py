"""The exact check of a JSON schema: the lowered schema's record and the ``jsonschema`` validator."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from smcgen.potentials.errors import GrammarError
from smcgen.potentials.json_schema_patterns import pattern_compiles, pattern_search


@dataclass(frozen=True)
class LoweredSchema:
    """A schema split into the grammar xgrammar generates and the exact check that completes it.

    ``grammar_schema``: what is compiled into the mask (equal to or looser than the schema, apart
    from the layout: schema property order, no properties or items the schema does not name).
    ``checked_after``: ``"<pointer>: <keyword>"`` for every part only the validator enforces.
    ``warnings``: what was ignored as the specification allows (unknown formats and keywords).
    ``schema``: the original schema, which ``validator`` checks exactly.
    """

    schema: dict[str, Any] | bool
    grammar_schema: dict[str, Any] | bool
    checked_after: tuple[str, ...]
    warnings: tuple[str, ...]
    validator: Any

    @property
    def exact(self) -> bool:
        """Whether the grammar alone generates exactly the schema (nothing is checked after)."""
        return not self.checked_after

    def violation(self, text: str) -> str | None:
        """Why ``text`` is not a document valid against the schema, or None when it is."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            return f"not JSON ({err.msg} at character {err.pos})"
        try:
            error = next(iter(self.validator.iter_errors(doc)), None)
        except Exception as err:  # noqa: BLE001 - e.g. a ref the validator cannot resolve: not valid, and why
            return f"the validator cannot check it ({type(err).__name__}: {str(err)[:120]})"
        if error is None:
            return None
        where = "#" + "".join(f"/{p}" for p in error.absolute_path)
        return f"{where} violates {error.validator}: {error.message[:200]}"


def validator_for(schema: dict[str, Any] | bool) -> Any:
    """The ``jsonschema`` validator of ``schema``'s own draft (2020-12 when it names none), patterns
    run by :func:`pattern_search`; :class:`GrammarError` when the metaschema rejects the schema."""
    try:
        import jsonschema
        from jsonschema.exceptions import SchemaError
    except ImportError as err:  # pragma: no cover - jsonschema is a dependency
        raise ImportError("JSON-schema grammars need the jsonschema package: pip install 'jsonschema>=4.18'") from err
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    # patterns run with re, or the regex package where re lacks an ECMA construct: in the metaschema
    # check (format "regex") and in the validator's own pattern keyword
    checker = copy.copy(cls.FORMAT_CHECKER)
    checker.checkers = {**checker.checkers, "regex": (pattern_compiles, ())}
    cls = jsonschema.validators.extend(cls, {"pattern": _pattern})
    try:
        cls.check_schema(schema, format_checker=checker)
    except SchemaError as err:
        where = "#" + "".join(f"/{p}" for p in err.absolute_path)
        raise GrammarError(f"JSON schema not supported: {where}: the schema is invalid ({err.message[:200]})") from None
    return cls(schema)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """The ``pattern`` keyword, as jsonschema's, with :func:`pattern_search` (re, else regex)."""
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not pattern_search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")
