"""The MQAR recall harness: probe model, state sizes, accuracy, best-over-lr summary, an end-to-end micro run."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from linmix.bench.recall import (PRESETS, MQARSlice, RecallJob, RecallPreset, RecallResults, RecallRunner,
                                 RecallTask, get_preset, probe_config, recall_accuracy, run_recall, state_bytes)
from linmix.models import LinmixForCausalLM
from linmix.tasks import mqar


def test_probe_config():
    config = probe_config("based", 32, 100, conv_size=3, num_heads=2, mixer_kwargs={"based": {"feature_dim": 4}})
    assert config.mixer_types == ["short_conv", "based"] and config.mlp is None
    assert config.mixer_kwargs["short_conv"] == {"conv_size": 3}
    assert config.mixer_kwargs["based"] == {"window_size": 0, "feature_dim": 4}  # probe default + user's
    assert probe_config("attention", 32, 100).mixer_kwargs["attention"] == {"use_rope": False}


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_state_bytes_match_a_real_cache(mixer):
    model = LinmixForCausalLM(probe_config(mixer, 32, 50, num_heads=2)).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 50, (1, 40)), use_cache=True)
    cache = out.past_key_values
    real = sum(t.numel() * t.element_size() for i in range(len(cache)) for t in cache[i].values()
               if t.is_floating_point())
    assert state_bytes(model, 40) == real


def test_recall_accuracy_matches_full_logits():
    model = LinmixForCausalLM(probe_config("attention", 16, 40, num_heads=2)).eval()
    sets = [("a", mqar(7, vocab_size=40, seq_len=16, num_kv_pairs=3, seed=1)),
            ("b", mqar(5, vocab_size=40, seq_len=32, num_kv_pairs=6, seed=2))]
    with torch.no_grad():
        got = recall_accuracy(model, sets, batch_size=3)
        correct, total = 0, 0
        for name, data in sets:
            pred = model(data.input_ids).logits.argmax(-1)
            scored = data.labels != -100
            hits = int((pred[scored] == data.labels[scored]).sum())
            assert got[name] == pytest.approx(hits / int(scored.sum()))
            correct, total = correct + hits, total + int(scored.sum())
    assert got["accuracy"] == pytest.approx(correct / total)


def _record(mixer, lr, task, accs):
    return {"mixer": mixer, "d_model": 16, "task": task, "lr": lr, "accuracy": accs,
            "overall_accuracy": sum(accs.values()) / len(accs), "state_bytes": 100, "num_params": 10}


def test_best_over_lr_and_table():
    tasks = (RecallTask((MQARSlice(8, 1, 4),), (MQARSlice(8, 1, 4),), 2),
             RecallTask((MQARSlice(16, 2, 4),), (MQARSlice(16, 2, 4), MQARSlice(32, 4, 4)), 2))
    preset = get_preset("micro").replace(tasks=tasks, lrs=(1e-3, 1e-2))
    runs = [_record("gla", 1e-3, 0, {"L8_kv1": 0.5}), _record("gla", 1e-2, 0, {"L8_kv1": 0.9}),
            _record("gla", 1e-3, 1, {"L16_kv2": 0.8, "L32_kv4": 0.6}),
            _record("gla", 1e-2, 1, {"L16_kv2": 0.2, "L32_kv4": float("nan")})]
    results = RecallResults(preset, ["gla"], runs)
    (row,) = results.best()
    assert row["accuracy"] == {"L8_kv1": 0.9, "L16_kv2": 0.8, "L32_kv4": 0.6} and row["lr"] == [1e-2, 1e-3]
    assert row["mean_accuracy"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    lines = results.table().splitlines()
    assert lines[0] == "| mixer | d_model | state bytes | L8 kv1 | L16 kv2 | L32 kv4 | mean | lr |"
    assert lines[2].startswith("| gla | 16 | 100 | 0.900 | 0.800 | 0.600 |")


def test_micro_run_end_to_end(tmp_path):
    results = run_recall("micro", mixers=["gla"], out_dir=tmp_path, seed=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"preset", "settings", "mixers", "slices", "best", "runs", "device", "jobs", "seed", "torch",
            "wall_time_s"} <= set(saved)
    assert saved["preset"] == "micro" and saved["mixers"] == ["gla"] and saved["slices"] == ["L32_kv4", "L64_kv8"]
    (run,) = saved["runs"]
    assert {"mixer", "d_model", "lr", "accuracy", "overall_accuracy", "train_loss", "steps", "state_bytes",
            "num_params", "train_seconds"} <= set(run)
    assert run["steps"] == run["total_steps"] == 2  # 64 examples, batch 32, 1 epoch
    assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values()) and math.isfinite(run["train_loss"])
    (row,) = saved["best"]
    assert set(row["accuracy"]) == {"L32_kv4", "L64_kv8"} and row["state_bytes"] == run["state_bytes"] > 0
    assert (tmp_path / "logs" / f"{RecallJob('gla', 16, 0, 3e-3).run_id}.jsonl").is_file()
    assert (tmp_path / "recall.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    assert "| gla | 16 |" in results.table()


def test_presets_and_bad_arguments():
    based = PRESETS["based"]
    assert [(s.seq_len, s.num_kv_pairs) for s in based.test_slices] == [
        (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]
    assert sum(s.num_examples for s in based.tasks[0].train) == 180_000 and based.vocab_size == 8192
    zoology = PRESETS["zoology"]
    assert len(zoology.tasks) == 3 and zoology.epochs == 64 and zoology.d_models == (64, 128, 256, 512)
    assert zoology.lrs == pytest.approx((1e-4, 10 ** (-4 + 2 / 3), 10 ** (-4 + 4 / 3), 1e-2))
    with pytest.raises(ValueError, match="unknown recall preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown mixers"):
        run_recall("micro", mixers=["nope"])
    with pytest.raises(ValueError, match="jobs"):
        run_recall("micro", jobs=0)
    with pytest.raises(ValueError, match="lrs"):
        get_preset("micro").replace(lrs=())
    assert isinstance(get_preset("quick"), RecallPreset)


def test_resume_keeps_finished_runs_and_failures_do_not_stop_the_others(tmp_path, monkeypatch):
    preset = get_preset("micro").replace(lrs=(1e-3, 1e-2))
    first = run_recall(preset, mixers=["gla"], out_dir=tmp_path, seed=1)
    records = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert records == sorted(f"{RecallJob('gla', 16, 0, lr).run_id}.json" for lr in (1e-3, 1e-2))
    # one run's record is lost (an interrupted benchmark): resume trains only that one
    lost = RecallJob("gla", 16, 0, 1e-2).run_id
    (tmp_path / "runs" / f"{lost}.json").unlink()
    trained = []
    original = RecallRunner.run

    def counting_run(self, job):
        trained.append(job.run_id)
        return original(self, job)

    monkeypatch.setattr(RecallRunner, "run", counting_run)
    again = run_recall(preset, mixers=["gla"], out_dir=tmp_path, seed=1, resume=True)
    assert trained == [lost]
    assert again.runs[0] == first.runs[0]  # the kept record, unchanged
    assert [r["run_id"] for r in again.runs] == [r["run_id"] for r in first.runs]
    # another seed is other settings: nothing is reused
    trained.clear()
    run_recall(preset, mixers=["gla"], out_dir=tmp_path, seed=2, resume=True)
    assert len(trained) == 2

    # a failing run is reported after the others finished, and the others are saved
    def failing_run(self, job):
        if job.lr == 1e-3:
            raise FloatingPointError("boom")
        return original(self, job)

    monkeypatch.setattr(RecallRunner, "run", failing_run)
    out = tmp_path / "failing"
    with pytest.raises(RuntimeError, match="(?s)1 of 2 training runs failed.*boom"):
        run_recall(preset, mixers=["gla"], out_dir=out, seed=1)
    saved = json.loads((out / "results.json").read_text())
    assert [r["lr"] for r in saved["runs"]] == [1e-2]


def test_quick_preset_mamba2_probe_init():
    # the quick preset's Mamba-2 probe init reaches the layer: softplus(dt_bias) in [dt_min, dt_max],
    # A = exp(A_log) in A_init_range (the constructor raises on a misspelt argument)
    quick = get_preset("quick")
    kwargs = quick.mixer_kwargs["mamba2"]
    model = RecallRunner(quick).build_model("mamba2", quick.d_models[0])
    mixer = model.base_model.layers[1].mixer
    dt, A = torch.nn.functional.softplus(mixer.dt_bias), mixer.A_log.exp()
    assert ((dt >= kwargs["dt_min"] * (1 - 1e-5)) & (dt <= kwargs["dt_max"] * (1 + 1e-5))).all()
    low, high = kwargs["A_init_range"]
    assert ((A >= low * (1 - 1e-5)) & (A <= high * (1 + 1e-5))).all()
