"""The error raised for grammars that cannot be compiled, and the engine's messages made readable."""

from __future__ import annotations

import re


class GrammarError(ValueError):
    """A regex, JSON schema or grammar that cannot be compiled; the message says what and where."""


_ENGINE_PREFIX = re.compile(r"^\[[0-9:]+\] \S+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


def engine_message(err: BaseException) -> str:
    """xgrammar's message without its timestamp / C++ source prefix."""
    lines = [_ENGINE_PREFIX.sub("", line).rstrip() for line in str(err).strip().splitlines()]
    return "\n".join(line for line in lines if line)


def with_caret(source: str, message: str) -> str:
    """Point at the position named in ``message`` ("position 4" or "line 2, column 7") in ``source``."""
    m = re.search(r"line (\d+), column (\d+)", message)
    if m:
        line_no, col = int(m.group(1)), int(m.group(2))
        lines = source.splitlines() or [""]
        if 1 <= line_no <= len(lines) and "^" not in message:
            return f"{message}\n  {lines[line_no - 1]}\n  {' ' * (col - 1)}^"
        return message
    m = re.search(r"position (\d+)", message)
    if m and "\n" not in source:
        pos = int(m.group(1))  # xgrammar counts from 1
        if 1 <= pos <= len(source) + 1:
            return f"{message}\n  {source}\n  {' ' * (pos - 1)}^"
    return message
