"""The `linmix` command: help of every command, one-line errors with exit status 2, tiny real runs."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from linmix.cli import main
from linmix.models import LinmixConfig, LinmixForCausalLM

HAS_CONVERT = importlib.util.find_spec("linmix.convert") is not None and \
    importlib.util.find_spec("linmix.convert.cli") is not None


@pytest.mark.parametrize("command", [[], ["recall"], ["bench"], ["bench", "ops"], ["generate"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: linmix") and "examples:" in out


@pytest.mark.skipif(not HAS_CONVERT, reason="linmix.convert.cli is not in this tree")
def test_convert_help(capsys):
    assert main(["convert", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: linmix convert")


def test_convert_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "linmix.convert.cli", None)  # makes the import fail
    assert main(["convert", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("linmix convert: error:") and "not available" in err


def test_missing_models_extra_is_one_line(monkeypatch, capsys):
    """Without transformers, `linmix recall` names the extra to install instead of printing a traceback."""
    monkeypatch.setitem(sys.modules, "linmix.models", None)  # makes `from linmix.models import ...` fail
    monkeypatch.delenv("LINMIX_TRACEBACK", raising=False)
    assert main(["recall", "--preset", "micro"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("linmix: error:") and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["recall", "--preset", "nope"], "--preset"),
    (["recall", "--jobs", "0"], "--jobs"),
    (["recall", "--lrs", "1e-3,x"], "--lrs"),
    (["recall", "--mixers", "nope", "--preset", "micro"], "unknown mixers"),
    (["recall", "--mixer-kwargs", "[1]"], "--mixer-kwargs"),
    (["recall", "--bogus"], "unrecognized arguments"),
    (["bench", "ops", "--ops", "nope"], "unknown ops"),
    (["generate", "--model", "/does/not/exist", "--prompt-ids", "1,2"], "no saved model"),
    (["generate", "--prompt-ids", "1"], "--model"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_one_line(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "error:" in captured.err and needle in captured.err and "Traceback" not in captured.err


def test_recall_micro(tmp_path, capsys):
    out = tmp_path / "recall"
    assert main(["recall", "--preset", "micro", "--mixers", "attention", "--out", str(out), "--lrs", "1e-3,1e-2",
                 "--seed", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "| mixer | d_model | state bytes | L32 kv4 | L64 kv8 | mean | lr |" in stdout
    assert "| attention | 16 |" in stdout
    saved = json.loads((out / "results.json").read_text())
    assert [r["lr"] for r in saved["runs"]] == [1e-3, 1e-2] and saved["seed"] == 2


def test_generate(tmp_path, capsys):
    torch.manual_seed(0)
    model = LinmixForCausalLM(LinmixConfig(vocab_size=50, hidden_size=16, num_layers=2, layers=["short_conv", "gla"],
                                           num_heads=2)).eval()
    model.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "3,1,4", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = model.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 3:]
    assert lines[0] == "tokens: " + ",".join(map(str, want.tolist()))
    assert "tokens/s" in lines[-1]
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "3,99"]) == 2  # id outside the vocab
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2  # no tokenizer saved
    assert capsys.readouterr().err.count("\n") == 2


def test_bench_ops_tiny(capsys):
    assert main(["bench", "ops", "--seq-lens", "16", "--ops", "linear_attn", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# linmix op benchmark") and "| linear_attn | torch | 16 |" in out
