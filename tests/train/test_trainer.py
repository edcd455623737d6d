"""The trainer: learning, schedule, clipping, logs, checkpoints, losses, data order, sweeps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from linmix.models import LinmixConfig, LinmixForCausalLM
from linmix.tasks import Batch, mqar
from linmix.train import (BucketedBatches, SweepResult, TrainConfig, Trainer, labelled_positions_loss, lr_at,
                          lr_sweep, next_token_loss, param_groups)

VOCAB = 32


def tiny_model(dtype: torch.dtype = torch.float32) -> LinmixForCausalLM:
    config = LinmixConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, layers=["short_conv", "attention"],
                          mlp=None, num_heads=2)
    return LinmixForCausalLM(config).to(dtype)


def tiny_data(n: int = 64, seed: int = 0) -> Batch:
    return mqar(n, vocab_size=VOCAB, seq_len=16, num_kv_pairs=2, seed=seed)


def as_dict(batch: Batch) -> dict[str, torch.Tensor]:
    return {"input_ids": batch.input_ids, "labels": batch.labels}


def test_loss_decreases_on_tiny_mqar():
    model, data = tiny_model(), tiny_data()
    with torch.no_grad():
        before = labelled_positions_loss(model, as_dict(data))[0].item()
    config = TrainConfig(lr=1e-2, max_steps=40, batch_size=16, progress=False)
    history = Trainer(model, config, data, loss_fn=labelled_positions_loss).fit()
    with torch.no_grad():
        after = labelled_positions_loss(model, as_dict(data))[0].item()
    assert after < before - 0.5, (before, after)
    assert history[-1]["step"] == 40 and all(math.isfinite(r["loss"]) for r in history if r["kind"] == "train")


def expected_lr(step: int, total: int, warmup: int, peak: float, min_ratio: float = 0.0) -> float:
    """The schedule written out: linear warmup to the peak, then a half cosine to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / (total - warmup - 1)
    return peak * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2)


def test_schedule_values_in_training():
    model, total, warmup, peak = tiny_model(), 12, 3, 2e-3
    config = TrainConfig(lr=peak, max_steps=total, warmup_steps=warmup, min_lr_ratio=0.1, batch_size=16,
                         log_every=1, progress=False)
    history = Trainer(model, config, tiny_data()).fit()
    lrs = [r["lr"] for r in history if r["kind"] == "train"]
    assert lrs == pytest.approx([expected_lr(s, total, warmup, peak, 0.1) for s in range(total)], rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[-1] == pytest.approx(0.1 * peak)


@pytest.mark.parametrize("total,warmup", [(1, 1), (5, 0), (100, 5), (7, 7)])
def test_lr_at(total, warmup):
    for step in range(total):
        assert lr_at(step, 0.5, total, warmup) == pytest.approx(
            expected_lr(step, total, warmup, 0.5) if total - warmup > 1 or step < warmup else 0.0, abs=1e-15)


def test_default_warmup_is_five_percent():
    trainer = Trainer(tiny_model(), TrainConfig(max_steps=200, progress=False), tiny_data())
    assert trainer.warmup_steps == 10 and trainer.total_steps == 200
    trainer = Trainer(tiny_model(), TrainConfig(epochs=3, batch_size=16, progress=False), tiny_data(50))
    assert trainer.total_steps == 3 * 4 and trainer.warmup_steps == 1


def test_gradient_clipping():
    model = tiny_model(torch.float64)
    reference = copy.deepcopy(model)
    batch = as_dict(tiny_data(8))

    def loud_loss(m, b):  # large gradients, so that clipping acts
        loss, metrics = next_token_loss(m, b)
        return 1e3 * loss, metrics

    clip = 0.5
    config = TrainConfig(max_steps=1, grad_clip=clip, log_every=1, progress=False)
    history = Trainer(model, config, [batch], loss_fn=loud_loss).fit()
    loud_loss(reference, batch)[0].backward()
    grads = [p.grad for p in reference.parameters() if p.grad is not None]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > clip
    assert history[-1]["grad_norm"] == pytest.approx(norm.item(), rel=1e-9)  # the norm before clipping
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:  # after the step the clipped gradients are still in .grad
            torch.testing.assert_close(p.grad, q.grad * (clip / norm), rtol=1e-9, atol=1e-12, msg=name)


def test_jsonl_log_and_eval(tmp_path):
    log = tmp_path / "logs" / "run.jsonl"
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"accuracy": torch.tensor(0.25), "other": 1}

    config = TrainConfig(max_steps=6, batch_size=16, log_every=2, eval_every=3, log_path=log, progress=False)
    history = Trainer(tiny_model(), config, tiny_data(), eval_fn=eval_fn).fit()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == history
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert calls == [False, False]  # eval mode during eval_fn
    train = records[0]
    assert {"loss", "accuracy", "lr", "grad_norm", "epoch", "elapsed_s"} <= set(train)
    assert [r for r in records if r["kind"] == "eval"][0] == {"kind": "eval", "step": 3, "accuracy": 0.25, "other": 1.0}


def test_early_stopping():
    config = TrainConfig(max_steps=20, batch_size=16, eval_every=2, early_stopping_metric="accuracy",
                         early_stopping_threshold=0.5, progress=False)
    scores = iter([0.1, 0.7, 0.9])
    trainer = Trainer(tiny_model(), config, tiny_data(), eval_fn=lambda m: {"accuracy": next(scores)})
    history = trainer.fit()
    assert trainer.step == 4 and [r["step"] for r in history if r["kind"] == "eval"] == [2, 4]


def test_save_round_trip(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, TrainConfig(max_steps=2, batch_size=16, lr=1e-3, progress=False), tiny_data())
    trainer.fit()
    trainer.save(tmp_path / "ckpt")
    loaded = LinmixForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    model.eval()
    ids = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert any(p.name.endswith(".safetensors") for p in (tmp_path / "ckpt").iterdir())
    saved = json.loads((tmp_path / "ckpt" / "train_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["max_steps"] == 2 and saved["betas"] == [0.9, 0.95]


def test_labelled_positions_loss_equals_full_ce():
    model = tiny_model(torch.float64)
    batch = as_dict(tiny_data(5))
    loss, metrics = labelled_positions_loss(model, batch)
    logits = model(batch["input_ids"]).logits  # [N, L, V]
    scored = batch["labels"] != -100
    want = F.cross_entropy(logits[scored], batch["labels"][scored])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    want_acc = (logits[scored].argmax(-1) == batch["labels"][scored]).double().mean()
    torch.testing.assert_close(metrics["accuracy"].double(), want_acc)
    full, full_metrics = next_token_loss(model, batch)
    torch.testing.assert_close(full, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(full_metrics["accuracy"], metrics["accuracy"])


def test_bucketed_batches_order():
    a = Batch(torch.arange(10 * 4).view(10, 4), torch.full((10, 4), -100))
    b = Batch(torch.arange(1000, 1000 + 5 * 8).view(5, 8), torch.full((5, 8), -100))
    data = BucketedBatches([a, b], batch_size=[4, 2], seed=3)
    assert len(data) == 3 + 3
    epoch0 = list(data.epoch(0))
    assert [mb.input_ids.tolist() for mb in epoch0] == [mb.input_ids.tolist() for mb in data.epoch(0)]
    firsts = sorted(int(x) for mb in epoch0 for x in mb.input_ids[:, 0])
    assert firsts == sorted(list(range(0, 40, 4)) + list(range(1000, 1040, 8)))  # every example once
    assert all(mb.seq_len in (4, 8) and len(mb) <= (4 if mb.seq_len == 4 else 2) for mb in epoch0)
    assert [mb.input_ids.tolist() for mb in epoch0] != [mb.input_ids.tolist() for mb in data.epoch(1)]
    with pytest.raises(ValueError, match="batch_size"):
        BucketedBatches([a, b], batch_size=[4])


def test_param_groups_decay_matrices_only():
    model = tiny_model()
    groups = param_groups(model, None, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(model.model.embed_tokens.weight) not in decayed  # tied with the LM head: not decayed
    assert id(model.model.layers[1].mixer.q_proj.weight) in decayed
    assert id(model.model.norm.weight) not in decayed
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every parameter once (tied weights once)
    only = param_groups(model, [model.model.norm.weight], 0.1)
    assert len(only) == 1 and only[0]["params"][0] is model.model.norm.weight


def test_frozen_parameters_stay():
    model = tiny_model()
    frozen = model.model.layers[0].mixer.conv.weight.detach().clone()
    params = [p for n, p in model.named_parameters() if "layers.0" not in n]
    Trainer(model, TrainConfig(max_steps=3, batch_size=16, lr=1e-2, progress=False), tiny_data(), params=params).fit()
    torch.testing.assert_close(model.model.layers[0].mixer.conv.weight, frozen, rtol=0, atol=0)


def test_lr_sweep_picks_best():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.randn(3, 1)
    data = [{"x": x, "y": y}]

    def loss_fn(model, batch):
        return F.mse_loss(model(batch["x"]), batch["y"]), {}

    def eval_fn(model):
        return {"accuracy": -F.mse_loss(model(x), y).item()}

    config = TrainConfig(max_steps=30, warmup_steps=0, weight_decay=0.0, progress=False)
    result = lr_sweep(lambda: torch.nn.Linear(3, 1), [1e-5, 1e-1], config, data, eval_fn, loss_fn=loss_fn)
    assert [r["lr"] for r in result.runs] == [1e-5, 1e-1]
    assert result.best_lr == 1e-1  # 30 steps of 1e-5 leave the loss where it started
    manual = SweepResult("accuracy", [{"lr": 1.0, "eval": {"accuracy": float("nan")}},
                                      {"lr": 2.0, "eval": {"accuracy": 0.1}}])
    assert manual.best_lr == 2.0


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(tiny_model(), {"lr": 1e-3}, tiny_data())
    with pytest.raises(ValueError, match="max_steps"):
        Trainer(tiny_model(), TrainConfig(progress=False), (as_dict(tiny_data(4)) for _ in range(2)))
    with pytest.raises(TypeError, match="train_data"):
        Trainer(tiny_model(), TrainConfig(progress=False), 3)
