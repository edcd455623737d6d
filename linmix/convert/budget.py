"""Wall-clock budgets and throughput accounting for the conversion's training stages.

A conversion that must finish within a fixed time (a GPU job with a hard limit) cannot trust a
token count alone: throughput depends on the device, the target and whatever else shares the GPU.
:class:`MeteredLoss` wraps a :class:`~linmix.train.Trainer` loss function: it counts the steps and
tokens that really went through, times them (the first step, which pays for kernel compilation and
autotuning, separately), and once the stage's seconds are spent it ends training after the step in
progress. Optionally (``fit_schedule``) it also re-plans the cosine learning-rate schedule over the
steps that fit in the budget, so a stage cut by its budget still ends with a decayed learning rate.
:func:`fit_within_budget` runs the trainer and appends the accounting to its history as a record
of kind ``"summary"``.

Timing adds no per-step device synchronisation: the clock is read on the host at each step, the
device is synchronised only after the first step and at the end (on CUDA the host runs at most the
kernel-launch queue ahead, so a budget is overshot by at most about one step).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]


class BudgetSpent(Exception):
    """Raised by :class:`MeteredLoss` before a step that the budget no longer allows (the previous
    step is complete: its parameters are updated)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MeteredLoss:
    """A loss function for :class:`~linmix.train.Trainer` that counts, times and limits training.

    Args:
        loss_fn: the wrapped ``loss_fn(model, batch) -> (loss, metrics)``.
        max_seconds: wall-clock budget in seconds, counted from the construction of this object
            (so work done before the first step, such as an initial evaluation, counts too);
            None = no limit. The first step always runs, so a budget of 0 gives exactly one step.
        fit_schedule: with a budget, make the trainer's learning-rate schedule (see
            :meth:`attach`) end where the budget does: from the second step on, the total number of
            steps is re-estimated from the measured step time (capped by the trainer's own total),
            and training also ends when the next step would no longer fit.

    Attributes:
        steps: steps started (each completes unless the loss raises).
        tokens: tokens of the batches' ``input_ids`` over those steps.
        stopped_by_budget: whether the budget ended training.

    Example:
        >>> import torch
        >>> from linmix.tasks import Batch
        >>> from linmix.train import TrainConfig, Trainer
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        >>> meter = MeteredLoss(lambda m, b: (m(b["input_ids"]).logsumexp(-1).mean(), {}), max_seconds=0)
        >>> data = Batch(torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8, 5)))
        >>> trainer = Trainer(model, TrainConfig(max_steps=4, batch_size=2, progress=False), data, loss_fn=meter)
        >>> summary = fit_within_budget(trainer, meter)[-1]
        >>> summary["steps"], summary["tokens"], summary["stopped_by_budget"]
        (1, 10, True)
    """

    def __init__(self, loss_fn: LossFn, max_seconds: float | None = None, *, fit_schedule: bool = False):
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not max_seconds >= 0):
            raise ValueError(f"MeteredLoss: max_seconds must be None or a number >= 0, got {max_seconds!r}")
        self.loss_fn = loss_fn
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.fit_schedule = bool(fit_schedule)
        self.start = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self.stopped_by_budget = False
        self.planned_steps: int | None = None   # the trainer's total; lowered by fit_schedule
        self._trainer_total: int | None = None
        self._train_start: float | None = None
        self._first_step_s: float | None = None
        self._first_step_end: float | None = None
        self._first_step_tokens = 0
        self._end: float | None = None
        self._last_loss: torch.Tensor | None = None

    # -- the Trainer's loss_fn ----------------------------------------------------------------------

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]
        now = time.perf_counter()
        if self.steps == 1 and self._first_step_s is None:
            _sync(ids.device)  # the first step (compilation, autotuning) timed on its own
            now = time.perf_counter()
            self._first_step_end = now
            self._first_step_s = now - self._train_start
        if self.steps >= 1:
            if self.max_seconds is not None and now - self.start >= self.max_seconds:
                self.stopped_by_budget = True
                raise BudgetSpent(f"{self.max_seconds:g} s budget spent after {self.steps} steps")
            if self.fit_schedule and self.max_seconds is not None and self.steps >= 2:
                self._replan(now)
            if self.planned_steps is not None and self.steps >= self.planned_steps:
                self.stopped_by_budget = True
                raise BudgetSpent(f"the {self.max_seconds:g} s budget fits {self.planned_steps} steps")
        else:
            self._train_start = now
        self.steps += 1
        self.tokens += ids.numel()
        if self.steps == 1:
            self._first_step_tokens = ids.numel()
        loss, metrics = self.loss_fn(model, batch)
        self._last_loss = loss.detach()
        return loss, metrics

    def _replan(self, now: float) -> None:
        """Lower ``planned_steps`` to the steps that fit in the budget at the measured step time."""
        per_step = (now - self._first_step_end) / (self.steps - 1)
        remaining = self.start + self.max_seconds - now
        fit = self.steps + max(0, math.floor(remaining / max(per_step, 1e-9)))
        if self._trainer_total is not None:
            fit = min(self._trainer_total, fit)
        self.planned_steps = max(self.steps, fit)

    # -- wiring and results ---------------------------------------------------------------------------

    def attach(self, trainer: Any) -> None:
        """Let ``fit_schedule`` drive ``trainer``'s learning rate: its warmup + cosine schedule is
        replaced by the same schedule over ``planned_steps`` (initially the trainer's total).
        Without ``fit_schedule`` (or without a budget) the trainer is left as it is."""
        self._trainer_total = trainer.total_steps
        if not (self.fit_schedule and self.max_seconds is not None):
            return
        from linmix.train.trainer import lr_at

        self.planned_steps = trainer.total_steps
        warmup, min_ratio = trainer.warmup_steps, trainer.config.min_lr_ratio
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step: lr_at(step, 1.0, self.planned_steps, warmup, min_ratio))

    def finish(self, device: torch.device | str | None = None) -> None:
        """Stop the clock (after synchronising ``device``, if CUDA)."""
        if device is not None:
            _sync(torch.device(device))
        self._end = time.perf_counter()

    def summary(self) -> dict[str, Any]:
        """The accounting as a history record: ``kind`` ``"summary"``, ``steps``, ``tokens``,
        ``train_s`` (first step to the end), ``first_step_s``, ``tokens_per_s`` (all steps),
        ``tokens_per_s_after_first`` (steady state; None with one step), ``stopped_by_budget``,
        ``max_seconds``, ``schedule_steps`` (the total the learning-rate schedule was last planned
        over with ``fit_schedule``, else None), ``seconds_since_start`` (budget clock) and ``loss``
        (of the last step)."""
        end = self._end if self._end is not None else time.perf_counter()
        train_s = end - self._train_start if self._train_start is not None else 0.0
        first_s = self._first_step_s if self._first_step_s is not None else train_s
        after = None
        if self.steps > 1 and train_s - first_s > 0:
            after = (self.tokens - self._first_step_tokens) / (train_s - first_s)
        return {"kind": "summary", "steps": self.steps, "tokens": self.tokens, "train_s": train_s,
                "first_step_s": first_s, "tokens_per_s": self.tokens / train_s if train_s > 0 else None,
                "tokens_per_s_after_first": after, "stopped_by_budget": self.stopped_by_budget,
                "max_seconds": self.max_seconds, "schedule_steps": self.planned_steps,
                "seconds_since_start": end - self.start,
                "loss": float(self._last_loss) if self._last_loss is not None else None}


def fit_within_budget(trainer: Any, meter: MeteredLoss) -> list[dict[str, Any]]:
    """``trainer.fit()`` with ``meter`` as its loss function (it must be ``trainer.loss_fn``):
    stops cleanly when the budget is spent, logs what ran, and returns the history with the
    :meth:`MeteredLoss.summary` record appended."""
    if trainer.loss_fn is not meter:
        raise ValueError("fit_within_budget: the trainer's loss_fn must be the MeteredLoss given")
    meter.attach(trainer)
    try:
        history = trainer.fit()
    except BudgetSpent as spent:
        history = trainer.history
        trainer.optimizer.zero_grad(set_to_none=True)
        logger.info("training stopped: %s", spent)
    meter.finish(trainer.device)
    summary = meter.summary()
    steady = summary["tokens_per_s_after_first"]
    logger.info("trained %d steps, %d tokens in %.1f s (first step %.1f s%s)%s", summary["steps"], summary["tokens"],
                summary["train_s"], summary["first_step_s"],
                f", {steady:.0f} tokens/s after it" if steady is not None else "",
                ", stopped by the budget" if summary["stopped_by_budget"] else "")
    history.append(summary)
    return history
