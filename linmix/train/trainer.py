"""A compact single-device trainer: AdamW, linear warmup + cosine decay, gradient clipping, bf16
autocast on CUDA, periodic evaluation, a tqdm progress bar, metrics to JSONL, ``save_pretrained``
checkpoints and learning-rate sweeps.

Data is a :class:`linmix.tasks.Batch` (the synthetic tasks; reshuffled every epoch from the
config's seed and cut into ``batch_size`` minibatches, kept on the training device), a
:class:`BucketedBatches` (several Batches of different lengths, each minibatch from one), or any
iterable of dict batches (e.g. a ``torch.utils.data.DataLoader``), whose tensors are moved to the device.
A loss function ``loss_fn(model, batch) -> (loss, metrics)`` sees a ``dict[str, Tensor]`` batch;
the default is next-token cross-entropy against the batch's (already shifted) ``labels``.

Example:
    >>> import torch
    >>> from linmix.models import LinmixConfig, LinmixForCausalLM
    >>> from linmix.tasks import mqar
    >>> model = LinmixForCausalLM(LinmixConfig(vocab_size=32, hidden_size=16, num_layers=2,
    ...                                        layers=["short_conv", "attention"], mlp=None, num_heads=2))
    >>> data = mqar(32, vocab_size=32, seq_len=16, num_kv_pairs=2)
    >>> config = TrainConfig(max_steps=3, batch_size=16, log_every=1, progress=False)
    >>> trainer = Trainer(model, config, data, loss_fn=labelled_positions_loss)
    >>> history = trainer.fit()
    >>> [record["step"] for record in history if record["kind"] == "train"]
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.tasks import IGNORE_INDEX, Batch

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


# -- configuration ------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer`.

    Attributes:
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, applied to weight matrices and convolution kernels
            only (parameters with >= 2 dims that are not embeddings; see :func:`param_groups`).
        betas: AdamW betas.
        warmup_steps: steps of linear warmup from 0 to ``lr``; ``None`` = 5% of the total steps.
        max_steps: total optimizer steps; ``None`` = ``epochs`` passes over the data.
        epochs: passes over the data (ignored when ``max_steps`` is set).
        batch_size: examples per step when the data is a :class:`~linmix.tasks.Batch`.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` at the last step.
        grad_clip: clip the global gradient norm to this value; ``None`` or 0 disables clipping.
        eval_every: run ``eval_fn`` every this many steps; ``None`` = at the end of every epoch.
            The final step is always evaluated.
        log_every: steps between training records (loss, lr, grad norm) in the history / log.
        log_path: append every record to this JSONL file.
        early_stopping_metric: stop after an evaluation where this metric of ``eval_fn`` ...
        early_stopping_threshold: ... reaches this value (Zoology stops at accuracy 0.99).
        seed: seeds the data order (and ``torch.manual_seed`` in :func:`lr_sweep` before each model).
        device: where to train ("cpu", "cuda", "cuda:1", ...); the model is moved there.
        bf16: bfloat16 autocast of the forward (CUDA only; parameters and optimizer stay float32).
        progress: show a tqdm progress bar (loss and learning rate).
        compile: ``torch.compile`` the model (in place) before training.
    """

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 64
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int | None = None
    log_every: int = 10
    log_path: str | os.PathLike | None = None
    early_stopping_metric: str | None = None
    early_stopping_threshold: float = 0.99
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int{' or None' if allow_none else ''}, "
                                 f"got {value!r}")

        for name in ("epochs", "batch_size", "log_every"):
            positive_int(name)
        for name in ("max_steps", "eval_every"):
            positive_int(name, allow_none=True)
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool)
                                              or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"TrainConfig: warmup_steps must be an int >= 0 or None, got {self.warmup_steps!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"TrainConfig: {name} must be a number >= 0, got {value!r}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"TrainConfig: grad_clip must be None or a number >= 0, got {self.grad_clip!r}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"TrainConfig: betas must be a pair (beta1, beta2), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (paths as strings)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        if out["log_path"] is not None:
            out["log_path"] = str(out["log_path"])
        return out


def lr_at(step: int, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warmup ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a
    cosine from ``lr`` (first step after warmup) down to ``min_lr_ratio * lr`` (last step).

    Example:
        >>> [round(lr_at(s, 1.0, total_steps=6, warmup_steps=2), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / (decay_steps - 1) if decay_steps > 1 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, params: Iterable[nn.Parameter] | None, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices / kernels, none on the rest.

    Decayed: parameters with >= 2 dims (linear weights, convolution kernels) except embedding tables
    (and an LM head tied to them): decaying an embedding row pulls tokens that are rarely seen
    towards 0, which hurts recall tasks over large vocabularies. Not decayed: biases, norm weights,
    the scalar / vector parameters of the mixers (decay rates such as ``A_log``, ``dt_bias``), and any
    parameter marked ``p._no_weight_decay = True`` (the Mamba convention).

    Args:
        model: the module the parameters belong to (to find its embeddings).
        params: the parameters to optimise; ``None`` = every parameter with ``requires_grad``.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    unique = list({id(p): p for p in chosen}.values())  # tied weights once
    if not unique:
        raise ValueError("Trainer: no parameter to optimise (params is empty or nothing requires grad)")
    def decayed(p: nn.Parameter) -> bool:
        return p.dim() >= 2 and id(p) not in embedding_ids and not getattr(p, "_no_weight_decay", False)

    decay = [p for p in unique if decayed(p)]
    no_decay = [p for p in unique if not decayed(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# -- losses -------------------------------------------------------------------------------------------

def _batch_tensors(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"loss: the batch must hold 'input_ids' [N, L] and 'labels' [N, L], got keys {sorted(batch)}")
    return batch["input_ids"], batch["labels"]


def _ce_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE (at least float32) and accuracy of logits [M, V] against targets [M] (-100 ignored)."""
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & scored
    accuracy = correct.sum() / scored.sum().clamp_min(1)
    return loss, {"accuracy": accuracy.detach()}


def next_token_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of ``model(input_ids).logits`` [N, L, V] against ``labels`` [N, L] at every
    position whose label is not -100 (labels already shifted: ``labels[:, t]`` is the target of
    position t), and the accuracy there.

    Example:
        >>> import torch
        >>> from linmix.models import LinmixConfig, LinmixForCausalLM
        >>> model = LinmixForCausalLM(LinmixConfig(vocab_size=11, hidden_size=8, num_layers=1, layers=["short_conv"]))
        >>> loss, metrics = next_token_loss(model, {"input_ids": torch.randint(0, 11, (2, 5)),
        ...                                         "labels": torch.randint(0, 11, (2, 5))})
        >>> loss.shape, sorted(metrics)
        (torch.Size([]), ['accuracy'])
    """
    input_ids, labels = _batch_tensors(batch)
    logits = model(input_ids=input_ids, use_cache=False).logits
    return _ce_metrics(logits.flatten(0, 1), labels.flatten())


def labelled_positions_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """:func:`next_token_loss` with the LM head applied only where ``labels != -100``.

    The decoder's hidden states [N, L, D] are gathered at the labelled positions [M, D] before the
    output embedding, so the head costs M x D x V instead of N x L x D x V (M = N x kv pairs in MQAR,
    a few percent of the positions). The loss and accuracy equal those of the full head restricted
    to the labelled positions. Needs a Hugging Face style causal LM: ``model.base_model`` (the
    decoder, returning ``last_hidden_state``) and ``model.get_output_embeddings()`` (the head).
    """
    input_ids, labels = _batch_tensors(batch)
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [N, L, D]
    scored = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[scored])  # [M, V]
    return _ce_metrics(logits, labels[scored])


# -- data ---------------------------------------------------------------------------------------------

def _to_device(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, Batch):
        batch = {"input_ids": batch.input_ids, "labels": batch.labels}
    if not isinstance(batch, Mapping):
        raise TypeError(f"Trainer: a batch must be a dict of tensors or a linmix.tasks.Batch, "
                        f"got {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class BucketedBatches:
    """Shuffled minibatches from one or more :class:`~linmix.tasks.Batch` es ("buckets"), each
    minibatch cut from a single bucket.

    Train mixes of different sequence lengths (Based's MQAR mix: 64 to 256 tokens) then need no
    padding: every minibatch has the length of its bucket. Each epoch reshuffles the examples of
    every bucket and the order of the minibatches, from ``seed`` and the epoch index.

    Args:
        buckets: one Batch or a sequence of them.
        batch_size: examples per minibatch: one int, or one per bucket (e.g. larger for short
            sequences, as Zoology does).
        seed: seed of the shuffles.

    Example:
        >>> from linmix.tasks import mqar
        >>> data = BucketedBatches([mqar(10, seq_len=16), mqar(6, seq_len=32)], batch_size=4)
        >>> len(data), sorted(b.seq_len for b in data.epoch(0))
        (5, [16, 16, 16, 32, 32])
    """

    def __init__(self, buckets: Batch | Sequence[Batch], batch_size: int | Sequence[int], *, seed: int = 0):
        self.buckets = [buckets] if isinstance(buckets, Batch) else list(buckets)
        if not self.buckets or not all(isinstance(b, Batch) and len(b) > 0 for b in self.buckets):
            raise ValueError("BucketedBatches: buckets must be one or more non-empty linmix.tasks.Batch")
        sizes = [batch_size] * len(self.buckets) if isinstance(batch_size, int) else list(batch_size)
        if len(sizes) != len(self.buckets) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                  for s in sizes):
            raise ValueError(f"BucketedBatches: batch_size must be a positive int or one per bucket "
                             f"({len(self.buckets)}), got {batch_size!r}")
        self.batch_sizes = sizes
        self.seed = seed
        self._epochs = 0

    def __len__(self) -> int:
        return sum(math.ceil(len(b) / s) for b, s in zip(self.buckets, self.batch_sizes))

    def to(self, device: torch.device | str) -> BucketedBatches:
        """The same minibatches with the data on ``device`` (moved once, not per step)."""
        out = BucketedBatches([b.to(device) for b in self.buckets], self.batch_sizes, seed=self.seed)
        out._epochs = self._epochs
        return out

    def epoch(self, index: int) -> Iterator[Batch]:
        """The minibatches of epoch ``index`` (the same index gives the same order)."""
        seed = self.seed * 1_000_003 + index * 1_009
        minibatches = [mb for i, (bucket, size) in enumerate(zip(self.buckets, self.batch_sizes))
                       for mb in bucket.shuffled(seed + i).split(size)]
        order = torch.randperm(len(minibatches), generator=torch.Generator().manual_seed(seed))
        return (minibatches[i] for i in order.tolist())

    def __iter__(self) -> Iterator[Batch]:
        self._epochs += 1
        return self.epoch(self._epochs - 1)


class _IterableSource:
    """Batches of a user iterable (a DataLoader, a list of dicts, ...), one pass per epoch."""

    def __init__(self, data: Iterable, device: torch.device):
        self.data = data
        self.device = device

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch(self, index: int) -> Iterator:
        return iter(self.data)


# -- the trainer --------------------------------------------------------------------------------------

class Trainer:
    """Train a model with AdamW, warmup + cosine, clipping, evaluation and logging.

    Args:
        model: the module to train (moved to ``config.device``).
        config: a :class:`TrainConfig`.
        train_data: a :class:`~linmix.tasks.Batch` (shuffled every epoch, ``config.batch_size``
            examples per step), a :class:`BucketedBatches` (several lengths), or any iterable of
            dict batches (sized unless ``config.max_steps`` is set; iterated again every epoch).
        eval_fn: ``eval_fn(model) -> dict`` of float metrics, run under ``torch.no_grad`` in eval
            mode (see ``TrainConfig.eval_every``).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; default :func:`next_token_loss`.
            Use :func:`labelled_positions_loss` when few positions are scored.
        params: parameters to optimise (default: all that require grad); the others stay frozen.

    Example: see the module docstring.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Batch | Iterable, *,
                 eval_fn: EvalFn | None = None, loss_fn: LossFn | None = None,
                 params: Iterable[nn.Parameter] | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Trainer: device {config.device!r} requested but CUDA is not available")
        self.model = model.to(self.device)
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn or next_token_loss
        if isinstance(train_data, Batch):
            train_data = BucketedBatches(train_data, config.batch_size, seed=config.seed)
        if isinstance(train_data, BucketedBatches):
            self.source: BucketedBatches | _IterableSource = train_data.to(self.device)
        elif isinstance(train_data, Iterable):
            self.source = _IterableSource(train_data, self.device)
        else:
            raise TypeError(f"Trainer: train_data must be a linmix.tasks.Batch or an iterable of dict batches, "
                            f"got {type(train_data).__name__}")
        if config.max_steps is not None:
            self.total_steps = config.max_steps
        else:
            try:
                steps_per_epoch = len(self.source)
            except TypeError:
                raise ValueError("Trainer: train_data has no len(); set TrainConfig.max_steps") from None
            if steps_per_epoch < 1:
                raise ValueError("Trainer: train_data yields no batch")
            self.total_steps = config.epochs * steps_per_epoch
        self.warmup_steps = (config.warmup_steps if config.warmup_steps is not None
                             else max(1, round(0.05 * self.total_steps)))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, params, config.weight_decay), lr=config.lr,
                                           betas=config.betas, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, 1.0, self.total_steps, self.warmup_steps, config.min_lr_ratio))
        self.history: list[dict[str, Any]] = []
        self.step = 0

    # -- helpers ---------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA when ``config.bf16``; a no-op elsewhere."""
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.config.log_path is not None:
            path = Path(self.config.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` (eval mode, no grad, autocast); record and return its metrics."""
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                metrics = {k: float(v) for k, v in dict(self.eval_fn(self.model)).items()}
        finally:
            self.model.train(was_training)
        self._record({"kind": "eval", "step": self.step, **metrics})
        return metrics

    def _batches(self) -> Iterator[tuple[int, Any]]:
        epoch = 0
        while True:
            produced = False
            for batch in self.source.epoch(epoch):
                produced = True
                yield epoch, batch
            if not produced:
                raise ValueError("Trainer: train_data yielded no batch in an epoch")
            epoch += 1

    # -- training --------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train for ``total_steps`` steps; returns the history (also appended to ``config.log_path``).

        Records are dicts with ``"kind"``: ``"train"`` (every ``log_every`` steps and the last:
        step, epoch, loss, metrics of ``loss_fn``, lr, grad_norm, elapsed seconds) or ``"eval"``
        (step and the metrics of ``eval_fn``).
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = self.model
        if cfg.compile:
            model.compile()
        model.train()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        steps_per_epoch = None
        with contextlib.suppress(TypeError):
            steps_per_epoch = len(self.source)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, desc="train", leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        batches = self._batches()
        running: list[torch.Tensor] = []
        try:
            while self.step < self.total_steps:
                epoch, batch = next(batches)
                batch = _to_device(batch, self.device)
                with self.autocast():
                    loss, metrics = self.loss_fn(model, batch)
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise ValueError("Trainer: loss_fn must return (scalar loss tensor, metrics dict)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = None
                if cfg.grad_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.step += 1
                running.append(loss.detach())
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    record = {"kind": "train", "step": self.step, "epoch": epoch,
                              "loss": float(torch.stack(running).float().mean()),
                              **{k: float(v) for k, v in metrics.items()}, "lr": lr,
                              "elapsed_s": round(time.perf_counter() - start, 3)}
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    running.clear()
                    self._record(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if bar is not None:
                    bar.update(1)
                end_of_epoch = steps_per_epoch is not None and self.step % steps_per_epoch == 0
                due = (self.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
                if self.eval_fn is not None and (due or last):
                    metrics_eval = self.evaluate()
                    if self._should_stop(metrics_eval):
                        logger.info("Trainer: early stop at step %d (%s = %.4f >= %.4f)", self.step,
                                    cfg.early_stopping_metric, metrics_eval[cfg.early_stopping_metric],
                                    cfg.early_stopping_threshold)
                        break
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _should_stop(self, metrics: Mapping[str, float]) -> bool:
        name = self.config.early_stopping_metric
        if name is None:
            return False
        if name not in metrics:
            raise ValueError(f"Trainer: early_stopping_metric {name!r} is not among the eval metrics {sorted(metrics)}")
        return metrics[name] >= self.config.early_stopping_threshold

    def save(self, path: str | os.PathLike) -> None:
        """``model.save_pretrained(path)`` (safetensors) plus ``train_config.json`` (the TrainConfig)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = getattr(self.model, "_orig_mod", self.model)
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"Trainer.save: the model ({type(model).__name__}) has no save_pretrained()")
        model.save_pretrained(path)
        (path / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")


# -- learning-rate sweeps -----------------------------------------------------------------------------

@dataclass
class SweepResult:
    """Outcome of :func:`lr_sweep`: one run per learning rate and the best of them.

    Attributes:
        metric: the eval metric that ranks the runs (higher is better).
        runs: per learning rate ``{"lr", "eval" (the last eval metrics), "history"}``, in sweep order.
    """

    metric: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        """The run with the highest final ``metric`` (the first one on ties; NaN counts as worst)."""
        def score(run: dict[str, Any]) -> float:
            value = run["eval"].get(self.metric, float("nan"))
            return -math.inf if math.isnan(value) else value

        return max(self.runs, key=score)

    @property
    def best_lr(self) -> float:
        return self.best["lr"]


def lr_sweep(make_model: Callable[[], nn.Module], lrs: Sequence[float], config: TrainConfig,
             train_data: Batch | Iterable, eval_fn: EvalFn, *, metric: str = "accuracy",
             loss_fn: LossFn | None = None) -> SweepResult:
    """Train a fresh model (same seed, same init) for each learning rate; rank by ``eval_fn``'s ``metric``.

    Args:
        make_model: builds a new model; called after ``torch.manual_seed(config.seed)``.
        lrs: the learning rates to try.
        config: the TrainConfig of every run (its ``lr`` is replaced).
        train_data, eval_fn, loss_fn: as for :class:`Trainer`.
        metric: key of ``eval_fn``'s dict to maximise.

    Example:
        >>> import torch
        >>> result = lr_sweep(lambda: torch.nn.Linear(2, 2), [1e-3, 1e-2],
        ...                   TrainConfig(max_steps=2, progress=False), [{"x": torch.randn(4, 2)}] * 2,
        ...                   eval_fn=lambda m: {"accuracy": -m.weight.norm().item()},
        ...                   loss_fn=lambda m, b: (m(b["x"]).pow(2).mean(), {}))
        >>> [run["lr"] for run in result.runs], result.best_lr in (1e-3, 1e-2)
        ([0.001, 0.01], True)
    """
    if not lrs:
        raise ValueError("lr_sweep: lrs must hold at least one learning rate")
    result = SweepResult(metric=metric)
    for lr in lrs:
        torch.manual_seed(config.seed)
        model = make_model()
        trainer = Trainer(model, dataclasses.replace(config, lr=float(lr)), train_data, eval_fn=eval_fn,
                          loss_fn=loss_fn)
        history = trainer.fit()
        evals = [r for r in history if r["kind"] == "eval"]
        final = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else {}
        if metric not in final:
            raise ValueError(f"lr_sweep: eval_fn returned no {metric!r} (got {sorted(final)})")
        result.runs.append({"lr": float(lr), "eval": final, "history": history})
    return result
