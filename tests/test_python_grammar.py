"""The Python grammar (smcgen.grammars.python) on a character-level vocabulary: real constructs are
accepted, invalid code is refused, and random walks under its masks give code that parses."""

from __future__ import annotations

import ast
import random

import pytest
import torch

from smcgen import GrammarPotential, SequenceBatch
from smcgen.core.sampling import allowed_from_bitmask
from smcgen.grammars.python import python_grammar

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "    ", "\n    "]
TOKENS = [*CHARS, None]
EOS = len(CHARS)

VALID = [
    "\n    return {k: v for k, v in d.items() if v}, (1,), ()\n",
    "\n    x = [i for i, j in enumerate(a) if j]\n    return sum(x for x in range(10)) + x[::-1][0]\n",
    "\n    return sorted(a, key=lambda t: (t[1], -t[0]), reverse=True)\n",
    "\n    return a if b else c\n",
    "\n    return ' '.join(w for w in s.split()) + \"\\n\\t\\x41\\u00e9\" + r'\\d' + b'\\x00'.hex()\n",
    "\n    return f\"{a!r:>10} {b['k']} {c:{w}.{p}f} {{}}\" + f'{x=}'\n",
    "\n    for i in range(3):\n        if i:\n            break\n        else:\n            continue\n    else:\n        pass\n",
    (
        "\n    try:\n        x = 1e-6\n    except (ValueError, KeyError) as e:\n        raise RuntimeError() from e\n"
        "    except Exception:\n        pass\n    else:\n        x = 0x1F\n    finally:\n        del x\n"
    ),
    (
        "\n    @functools.wraps(f)\n    async def g(a, b=1, /, *args, c, d=2, **kw) -> int:\n"
        "        async with lock as l, other:\n            return await f(*args, **kw)\n    return g\n"
    ),
    "\n    class A(B, metaclass=M):\n        x: int = 1\n\n        def m(self):\n            return self.x\n",
    "\n    if (n := len(a)) > 10:\n        return n\n    while True:\n        yield from a\n",
    (
        "\n    match p:\n        case [x, *rest] | (x, *rest):\n            return x\n        case {'k': v, **kw}:\n"
        "            return v\n        case Point(x=0, y=y) if y > 0:\n            return y\n        case _:\n            return None\n"
    ),
    "\n    x = (1 +\n         2)  # comment\n\n    # a comment line\n    y = 3; z = 4\n    return x \\\n        + y\n",
    (
        "\n    global g\n    nonlocal_ = not a and b or c is not d\n    assert x in y, 'msg'\n    import os.path as p, sys\n"
        "    from ..m import (a as b,\n        c,)\n    a, *b = c\n    d[1:2, ::3] += 1\n    return ...\n"
    ),
    "\n    x=a+b*c//d**-e@f|g&h^i<<j>>k%l\n    return x<y<=z!=w==v>=u>t\n",
    # the whitespace and chained-assignment rules written for cheap masks (docs/python_grammar.md)
    "\n    a = b = yield c\n    d, *e = f[0] = g = \\\n        h\n    x = f(  # c\n        a, \\\n        b,  # d\n    )\n",
    "\n    while(x < 0):\n        del(a[1])\n        assert(len(b) > 1), 'm'\n        yield('x')\n    return('...') + 1\n",
    (
        "\n    def inner():\n        def deeper():\n            if a:\n                for b in c:\n                    while d:\n"
        "                        return e\n        return deeper\n    return inner\n```\n"
    ),
]

INVALID = [
    "\n    break\n",  # outside a loop
    "\n    return f(a=1, b)\n",  # positional after keyword
    "\n    def g(a=1, b):\n        pass\n",  # non-default after default
    "\n    x = = 1\n",
    "\n    if = 1\n",  # keyword as a name
    "\n    return x if y else2\n",
    "\n    return (1, 2\n",
    "\n    if x:\n    return 1\n",  # missing indentation
    "\n    x = 1\n      y = 2\n",  # unexpected indentation
    "\n    return 01\n",
    "\n    f() = 1\n",
    "\n    x := 1\n",  # an unparenthesized walrus statement
    "\n    a = b =\n",  # a chained assignment needs a value
    "\n    x = f(a  # c)\n",  # a comment runs to the end of the line
    "\n    return b'\\xff' + 'a\\x4'\n",
    '\n    print("done")\nprint(1)\n',  # code after the function
]


@pytest.fixture(scope="module")
def grammar():
    return GrammarPotential.python(TOKENS, eos_token_ids=[EOS], depth=7)


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text] + [EOS]


def accepted(g, texts: list[str]) -> list[bool]:
    return (g.log_complete(SequenceBatch([encode(t) for t in texts], [], None)) == 0).tolist()


def test_accepts_real_code(grammar):
    for text in VALID:
        ast.parse("def f():" + text.replace("```\n", ""))  # the examples themselves are valid Python
    assert accepted(grammar, VALID) == [True] * len(VALID)


def test_refuses_invalid_code(grammar):
    assert accepted(grammar, INVALID) == [False] * len(INVALID)


def test_a_token_may_span_a_newline_and_the_next_indentation(grammar):
    text = "\n    if a:\n        return b\n    return c\n"
    split = [CHARS.index("\n    "), *encode(text[5:])]  # "\n    " as one token, then characters
    mixed = [CHARS.index(c) for c in "\n    if a:"] + [CHARS.index("\n    "), CHARS.index("    ")]
    mixed += encode("return b\n    return c\n")
    ok = grammar.log_complete(SequenceBatch([split, mixed], [], None)) == 0
    assert ok.tolist() == [True, True]


def test_random_walks_parse(grammar):
    rng = random.Random(0)
    closers = [CHARS.index(c) for c in "\n)]:"]
    walks = 0
    for _ in range(25):
        prefix: list[int] = []
        for _ in range(160):
            mask = grammar.next_token_bitmask(torch.tensor([[0, *prefix]]), 1)
            allowed = allowed_from_bitmask(mask, len(TOKENS), torch.device("cpu"))[0]
            chars = [v for v in range(EOS) if allowed[v]]
            if allowed[EOS] and (not chars or rng.random() < 0.3):
                text = "".join(CHARS[t] for t in prefix).replace("```", "")
                ast.parse("def f():" + text)
                walks += 1
                break
            shut = [v for v in closers if allowed[v]]
            prefix.append(rng.choice(shut if shut and rng.random() < 0.4 else chars))
    assert walks >= 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 1}, "depth"), ({"indent": "  x"}, "indent"), ({"start": "file"}, "start")],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        python_grammar(**kwargs)


def test_module_start_accepts_top_level_code():
    g = GrammarPotential.python(TOKENS, eos_token_ids=[EOS], start="module", depth=3, fence=False)
    assert accepted(g, ["import os\n\ndef f(x):\n    return x\n", "x = 1\n"]) == [True, True]
    assert accepted(g, ["    x = 1\n"]) == [False]
