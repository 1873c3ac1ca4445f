"""Code with unit tests as the reward: small Python functions written for this recipe.

The reply starts with the function's ``def`` line and docstring (given); the model writes the body.
Reward R(x) = the fraction of the problem's unit tests that the function passes, run in a separate
Python process (one per batch of candidates, one second per candidate). SMC targets
p(x) exp(beta R(x)); since the tests can only run on a finished function, the prefix twist is a
cheap syntax check: the lines written so far (the unfinished last line left out, the code cut at a
closing Markdown fence) must compile once an indented ``pass`` is appended, else the twist is
-beta/2. Success = every test passes. Compared with best-of-N (the N samples' best test score).

    python recipes/code_tests.py [--groups 3] [--cases 4] [--beta 8] [--plot code_tests.png]
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from _harness import Case, RewardTask, load_for_recipe, report, reward_args, run_reward_task, strip_fence

from smcgen import Potential, SequenceBatch

PROBLEMS = [
    (
        'def add(a, b):\n    """Return the sum of a and b."""',
        "add",
        [((1, 2), 3), ((-4, 4), 0), ((10, 5), 15), ((0, 0), 0)],
    ),
    (
        'def is_even(n):\n    """Return True if the integer n is even, else False."""',
        "is_even",
        [((2,), True), ((3,), False), ((0,), True), ((-7,), False)],
    ),
    (
        'def largest(xs):\n    """Return the largest number in the non-empty list xs."""',
        "largest",
        [(([1, 5, 3],), 5), (([-2, -9],), -2), (([7],), 7), (([0, 0, 1],), 1)],
    ),
    (
        'def reverse(s):\n    """Return the string s reversed."""',
        "reverse",
        [(("abc",), "cba"), (("",), ""), (("racecar",), "racecar"), (("ab",), "ba")],
    ),
    (
        'def count_vowels(s):\n    """Return how many of the characters of s are vowels (a, e, i, o, u)."""',
        "count_vowels",
        [(("hello",), 2), (("xyz",), 0), (("aeiou",), 5), (("banana",), 3)],
    ),
    (
        'def factorial(n):\n    """Return n! for a non-negative integer n."""',
        "factorial",
        [((0,), 1), ((1,), 1), ((5,), 120), ((3,), 6)],
    ),
    (
        'def square_all(xs):\n    """Return a list of the squares of the numbers in xs."""',
        "square_all",
        [(([1, 2, 3],), [1, 4, 9]), (([],), []), (([-2],), [4]), (([0, 5],), [0, 25])],
    ),
    (
        'def is_palindrome(s):\n    """Return True if the string s reads the same backwards."""',
        "is_palindrome",
        [(("aba",), True), (("ab",), False), (("",), True), (("level",), True)],
    ),
]

# runs in a fresh interpreter: each candidate exec'd alone with a one-second alarm
CHILD = r"""
import json, signal, sys
def alarm(*_): raise TimeoutError
signal.signal(signal.SIGALRM, alarm)
out = []
for job in json.load(sys.stdin):
    passed = 0
    try:
        signal.alarm(1)
        env = {}
        exec(job["code"], env)
        fn = env[job["fn"]]
        for args, want in job["tests"]:
            try:
                passed += fn(*args) == want
            except TimeoutError:
                raise  # the alarm fires once: a looping candidate stops here
            except Exception:
                pass
    except BaseException:
        pass
    finally:
        signal.alarm(0)
    out.append(passed / len(job["tests"]))
print(json.dumps(out))
"""


def extract_code(text: str) -> str:
    """The function: the text up to a closing Markdown fence, without an opening one."""
    body = strip_fence(text, "python")
    return body.split("```", 1)[0]


class TestRunner:
    """Fraction of tests passed per candidate, run in a subprocess per batch, cached by code."""

    def __init__(self):
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, case: Case, texts: list[str]) -> list[float]:
        _, fn, tests = case.data
        codes = [extract_code(t) for t in texts]
        todo = sorted({c for c in codes if (fn, c) not in self.cache})
        if todo:
            jobs = [{"code": c, "fn": fn, "tests": [[list(a), w] for a, w in tests]} for c in todo]
            try:
                proc = subprocess.run(
                    [sys.executable, "-I", "-c", CHILD],
                    input=json.dumps(jobs),
                    text=True,
                    check=False,
                    capture_output=True,
                    timeout=5 + 2 * len(jobs),
                )
                scores = json.loads(proc.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                scores = [0.0] * len(todo)
            for c, s in zip(todo, scores):
                self.cache[(fn, c)] = float(s)
        return [self.cache[(fn, c)] for c in codes]


def syntax_ok_so_far(code: str) -> bool:
    """The complete lines of ``code`` compile once an indented ``pass`` closes the open block."""
    lines = code.split("\n")[:-1]  # the last line may be unfinished
    src = "\n".join(lines)
    for suffix in ("", "\n    pass", "\n        pass", "\n            pass", "\n                pass"):
        try:
            compile(src + suffix, "<prefix>", "exec")
            return True
        except (SyntaxError, ValueError):
            continue
    return False


class TestsPassed(Potential):
    """exp(beta * tests passed) when finished; a syntax twist (0 or -beta/2) on prefixes."""

    def __init__(self, case: Case, runner: TestRunner, beta: float):
        self.case, self.runner, self.beta = case, runner, beta

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        ok = [syntax_ok_so_far(extract_code(self.case.prefix + t)) for t in batch.texts]
        return torch.tensor([0.0 if o else -self.beta / 2 for o in ok], dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        scores = self.runner(self.case, [self.case.prefix + t for t in batch.texts])
        return self.beta * torch.tensor(scores, dtype=torch.float64)


RUNNER = TestRunner()

TASK = RewardTask(
    title="Recipe: code with unit tests as the reward",
    cases=[
        Case("Complete this Python function. Reply with the code only.\n\n" + h + "\n", data=(h, fn, tests), prefix=h)
        for h, fn, tests in PROBLEMS
    ],
    reward=RUNNER,
    success=lambda case, text: RUNNER(case, [text])[0] == 1.0,
    potential=lambda case, lm, args: TestsPassed(case, RUNNER, args.beta),
    max_new_tokens=32,
    temperature=1.0,
    metric_note="reward = fraction of the 4 unit tests passed; success = all 4; SMC target p(x) exp(beta R(x)), "
    "twist = syntax of the lines so far",
)


def main() -> None:
    ap = reward_args(__doc__, groups=3, cases=4)
    ap.add_argument("--beta", type=float, default=8.0, help="inverse temperature of the reward: exp(beta R)")
    args = ap.parse_args()
    lm = load_for_recipe(args)
    results = run_reward_task(TASK, args, lm)
    report(TASK, results, args, args.plot or "code_tests.png")


if __name__ == "__main__":
    main()
