"""The CLI's output constraints (--regex, --json-schema FILE, --grammar FILE) and ``smcgen serve``'s options."""

from __future__ import annotations

import json

import pytest

from smcgen.cli import build_parser, build_serve_parser, grammar_from_args, main
from smcgen.potentials.errors import GrammarError


def test_each_constraint_flag_builds_its_grammar(tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    ebnf = tmp_path / "num.ebnf"
    ebnf.write_text("root ::= [1-9] [0-9]*")
    lark = tmp_path / "num.lark"
    lark.write_text("start: /[1-9][0-9]*/")
    parser = build_parser()
    assert grammar_from_args(parser.parse_args([])) is None
    assert grammar_from_args(parser.parse_args(["--regex", "[a-z]+"])).kind == "regex"
    assert grammar_from_args(parser.parse_args(["--json-schema", str(schema)])).kind == "json_schema"
    assert grammar_from_args(parser.parse_args(["--grammar", str(ebnf)])).kind == "ebnf"
    assert grammar_from_args(parser.parse_args(["--grammar", str(lark)])).kind == "lark"
    with pytest.raises(SystemExit):  # one constraint at most
        parser.parse_args(["--regex", "a", "--grammar", str(ebnf)])
    with pytest.raises(GrammarError):
        grammar_from_args(parser.parse_args(["--regex", "(unclosed"]))


def test_bad_constraint_exits_with_a_message(tmp_path, capsys):
    assert main(["--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "invalid output constraint" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    assert main(["--json-schema", str(bad)]) == 2
    assert "objekt" in capsys.readouterr().err


def test_serve_options():
    args = build_serve_parser().parse_args(["smollm2-135m", "--draft", "smollm2-135m-draft", "--port", "9000"])
    assert (args.model, args.draft, args.host, args.port) == ("smollm2-135m", "smollm2-135m-draft", "127.0.0.1", 9000)
    assert main(["serve", "smollm2-135m", "-n", "0"]) == 2  # checked before any model loads
