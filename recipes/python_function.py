"""Python function completion under a Python-subset grammar on SmolLM2-135M-Instruct.

The reply starts with the function's ``def`` line and docstring (given, without the newline that
ends it, so the tokenization at the boundary is the usual one); the model writes the body. The grammar (recipes/_grammars.py) is a Python subset whose every string parses and
compiles. Compares unconstrained sampling, plain masking and grammar-constrained SMC (N = 4, 8):
validity (``ast.parse`` then ``compile``), the target's per-token log-likelihood, seconds per sample.

    python recipes/python_function.py [--samples 20] [--draft] [--threads 1]
"""

from __future__ import annotations

import ast

from _grammars import python_function_body_grammar
from _harness import Task, main, strip_fence

from smcgen import GrammarPotential

HEADER = 'def is_prime(n):\n    """Return True if the integer n is a prime number, else False."""'


def valid_python(text: str) -> bool:
    """Valid iff the function (a surrounding Markdown code fence allowed) parses and compiles."""
    body = strip_fence(text, "python")
    try:
        ast.parse(body)
        compile(body, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


TASK = Task(
    title="Recipe: Python function completion under a Python-subset grammar",
    prompt="Complete this Python function. Reply with the code only.\n\n" + HEADER + "\n",
    grammar=GrammarPotential.ebnf(python_function_body_grammar()),
    validate=valid_python,
    max_new_tokens=96,
    prefix=HEADER,
)

if __name__ == "__main__":
    main(TASK, default_samples=20, description=__doc__)
