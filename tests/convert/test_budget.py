"""Wall-clock budgets of the training stages (MeteredLoss): counting, stopping, budget-fitted schedule."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from linmix.convert.budget import MeteredLoss, fit_within_budget
from linmix.tasks import Batch
from linmix.train import TrainConfig, Trainer


def next_token_loss(model, batch):
    """Cross-entropy of a model that maps ids [B, T] to logits [B, T, V]."""
    logits = model(batch["input_ids"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()), {}


def _setup(max_steps: int, **config):
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))
    data = Batch(torch.randint(0, 20, (12, 6)), torch.randint(0, 20, (12, 6)))
    return model, data, TrainConfig(max_steps=max_steps, batch_size=3, progress=False, log_every=1, **config)


def test_without_a_budget_training_is_unchanged_and_counted():
    model, data, config = _setup(7)
    plain = Trainer(copy.deepcopy(model), config, data, loss_fn=next_token_loss)
    plain.fit()
    meter = MeteredLoss(next_token_loss)
    trainer = Trainer(model, config, data, loss_fn=meter)
    history = fit_within_budget(trainer, meter)
    for p, q in zip(plain.model.parameters(), trainer.model.parameters()):
        assert torch.equal(p, q)
    summary = history[-1]
    assert summary["kind"] == "summary" and summary["steps"] == trainer.step == 7
    assert summary["tokens"] == 7 * 3 * 6 and not summary["stopped_by_budget"]
    assert summary["tokens_per_s"] > 0 and summary["tokens_per_s_after_first"] > 0
    train = [r for r in history if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 8))
    assert summary["loss"] == pytest.approx(train[-1]["loss"])   # log_every=1: the last step's loss


def test_a_zero_budget_runs_exactly_one_step():
    model, data, config = _setup(50)
    before = [p.detach().clone() for p in model.parameters()]
    meter = MeteredLoss(next_token_loss, max_seconds=0)
    trainer = Trainer(model, config, data, loss_fn=meter)
    summary = fit_within_budget(trainer, meter)[-1]
    assert summary["steps"] == trainer.step == 1 and summary["tokens"] == 3 * 6
    assert summary["stopped_by_budget"] and summary["max_seconds"] == 0
    assert summary["tokens_per_s_after_first"] is None
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the step was applied
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fit_schedule", [False, True])
def test_budget_fitted_schedule_ends_with_a_decayed_learning_rate(fit_schedule):
    model, data, config = _setup(10_000, lr=1e-2, warmup_steps=0)
    lrs = []

    def slow_loss(m, batch):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        time.sleep(0.02)
        return next_token_loss(m, batch)

    meter = MeteredLoss(slow_loss, max_seconds=0.3, fit_schedule=fit_schedule)
    trainer = Trainer(model, config, data, loss_fn=meter)
    summary = fit_within_budget(trainer, meter)[-1]
    assert summary["stopped_by_budget"] and 2 <= summary["steps"] < 10_000
    assert lrs[0] == pytest.approx(1e-2)
    if fit_schedule:
        assert lrs[-1] < 0.5e-2      # planned to end at the budget: decayed
    else:
        assert lrs[-1] > 0.99e-2     # planned over 10,000 steps: still at the peak


def test_bad_budget_is_a_clear_error():
    for bad in (-1, "5", True, float("nan")):
        with pytest.raises(ValueError, match="max_seconds"):
            MeteredLoss(next_token_loss, max_seconds=bad)
    model, data, config = _setup(2)
    with pytest.raises(ValueError, match="loss_fn must be the MeteredLoss"):
        fit_within_budget(Trainer(model, config, data, loss_fn=next_token_loss), MeteredLoss(next_token_loss))
