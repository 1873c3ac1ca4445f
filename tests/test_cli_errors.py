"""The CLI prints a library error's message and exits with status 2, without a traceback (issue 14, item 7)."""

from __future__ import annotations

import pytest
import torch

from smcgen.cli import main

FAST = ["--draft", "none", "-n", "2", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_unavailable_cuda_device_is_explained(capsys):
    # on a GPU host, ask for a CUDA device index that does not exist instead
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    code, err = _run(capsys, ["--device", device])
    assert code == 2 and "Traceback" not in err
    assert ("CUDA is not available" in err) if device == "cuda" else ("CUDA device(s) here" in err)


def test_unknown_device_name(capsys):
    code, err = _run(capsys, ["--device", "tpu9"])
    assert code == 2 and "is not a device name" in err


def test_value_error_prints_message_and_status_2(capsys):
    code, err = _run(capsys, [*FAST, "--max-new-tokens", "100000"])
    assert code == 2 and "exceeds the model context" in err and "Traceback" not in err


def test_empty_raw_prompt(capsys):
    code, err = _run(capsys, [*FAST, "--raw", "--prompt", ""])
    assert code == 2 and "prompt is empty" in err


def test_debug_shows_the_original_error(capsys):
    with pytest.raises(ValueError, match="exceeds the model context"):
        main([*FAST, "--max-new-tokens", "100000", "--debug"])


def test_invalid_option_is_named_by_its_flag(capsys):
    code, err = _run(capsys, [*FAST, "--target-temperature", "1e-40"])
    assert code == 2 and "--target-temperature: " in err and "greater than or equal to 0.0001" in err
    code, err = _run(capsys, [*FAST, "-n", "0"])
    assert code == 2 and "-n/--n-particles: Input should be greater than or equal to 1" in err
    assert "n_particles" not in err and "Traceback" not in err


def test_help_names_the_other_commands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "smcgen distill --help" in out and "smcgen serve --help" in out


def test_bad_draft_dtype_names_the_option(capsys):
    argv = [a for a in FAST if a not in ("--draft", "none")] + ["--draft-dtype", "int8"]
    code, err = _run(capsys, argv)
    assert code == 2 and "--draft-dtype" in err and "Traceback" not in err


def test_draft_dtype_auto_follows_the_cpu(capsys, monkeypatch):
    """The default --draft-dtype auto runs the draft in bf16 where the CPU does bf16 natively, as
    loaded elsewhere; 'none' keeps it as loaded."""
    import smcgen.runners.transformers as tr

    asked = []
    real = tr.LanguageModel.to_dtype
    monkeypatch.setattr(tr.LanguageModel, "to_dtype", lambda self, d: asked.append(d) or real(self, d))
    argv = [*(a for a in FAST if a not in ("--draft", "none")), "--draft", "smollm2-135m-draft"]
    for native, extra, want in ((True, [], ["bfloat16"]), (False, [], []), (True, ["--draft-dtype", "none"], [])):
        asked.clear()
        monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda native=native: native)
        assert main([*argv, *extra]) == 0
        assert asked == want
    capsys.readouterr()
