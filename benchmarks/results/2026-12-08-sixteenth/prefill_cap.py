"""Run benchmarks/prefill_profile.py with attention.IEEE_MAX_BLOCK_M set to argv[1] (one-off)."""

import runpy
import sys

import smcgen.kernels.attention as A

A.IEEE_MAX_BLOCK_M = int(sys.argv[1])
print("IEEE_MAX_BLOCK_M", A.IEEE_MAX_BLOCK_M, flush=True)
sys.argv = ["benchmarks/prefill_profile.py"] + sys.argv[2:]
sys.path.insert(0, "benchmarks")
runpy.run_path("benchmarks/prefill_profile.py", run_name="__main__")
