"""How much does a fixed-size state remember? The MQAR recall benchmark of Zoology and Based.

For each token mixer, the standard two-layer probe is trained on multi-query associative recall
(:func:`linmix.tasks.mqar`) and scored on test slices of growing length and number of key-value
pairs::

    embedding -> [short_conv] -> [mixer under test] -> norm -> LM head      (no MLPs)

The short convolution (:class:`~linmix.layers.short_conv.ShortConvMixer`) copies each key into the
position of its value; the mixer must then retrieve, at each query, the value stored next to the
matching key. Softmax attention keeps every token and solves every slice; a mixer with a fixed
state forgets once the pairs outnumber what its state can hold, so accuracy traces state size and
the update rule (additive, decayed, delta rule).

Every (mixer, d_model, task, learning rate) is one training run (:class:`~linmix.train.Trainer`,
loss and head only at the query positions). A row of the result table is the best run over the
learning-rate sweep (by the accuracy over all test queries, as Zoology ranks runs), with its
accuracy per test slice and the model's recurrent state size: the sum of the layers'
``state_bytes`` at the longest test length, batch 1 (a KV cache for attention).

Presets (:data:`PRESETS`):

* ``quick``: a CPU run that already separates the mixers, about five minutes on one core (one
  torch thread; about 3.5 minutes with ``jobs=2`` on two cores):
  d_model 64, vocab 256, one epoch of 800 steps x 32 examples on (64, 8) and (64, 16) (zeros
  between the queries), lr 1e-2, tested on (64, 4), (64, 8), (64, 16), (128, 32), (256, 64).
  One learning rate: within 800 steps 3e-3 left most mixers unlearned and 1e-2 was the best single
  point for every mixer tried; a second point would double the time (``--lrs`` adds more). Mixers:
  attention, based (``feature_dim=8``, as Zoology's probe, for speed), gated_deltanet
  (``dt_max=0.01``: decays start slow; with the LM init it does not learn within this budget),
  deltanet, gla, linear_attn. Mamba-2 (``--mixers mamba2``) gets a probe init, ``dt_min=0.1,
  dt_max=1, A_init_range=(0.01, 0.1)``: its LM init (dt in [0.001, 0.1], A in [1, 16]) writes
  with weight dt, small beside the D skip, and forgets within a few tokens at the larger decay
  rates dt * A (up to 1.6 per step); in 800 steps Adam moves dt_bias and A_log by at most the
  sum of the lr schedule, about 4, while the probe init is 3-5 away, and the layer stays on the
  MQAR loss plateau (L64 kv4 0.24 at seed 0). With the probe init, dt * A starts in [0.001, 0.1]
  and writes are 10x stronger. It is still not in the default set: when the plateau ends depends
  on the seed, at step ~350 or after step 800 (L64 kv4 1.00 at seed 0, 0.38 at seed 1; at seed 0,
  lr 3e-3 and 3e-2 reached 0.48 and 0.94).
* ``zoology``: Zoology (Arora et al. 2023) Figure 2: one run per (seq_len, kv pairs) in
  (64, 4), (128, 8), (256, 16): 100k train / 3k test examples of the same slice, vocab 8192,
  non-query positions 0 (``random_non_queries=False``), power_a 0.01, batch 512 (256 at length
  256), d_model in {64, 128, 256, 512}, lr in logspace(-4, -2, 4), 64 epochs, early stop at 0.99
  test accuracy.
* ``based``: Based (Arora et al. 2024) Figure 2: one run on the train mix (64, 4) x 100k,
  (128, 8), (256, 16), (256, 32), (256, 64) x 20k each, tested on (64, 4), (64, 8), (64, 16),
  (128, 32), (256, 64), (512, 128), (1024, 256) x 1000, vocab 8192, random non-query tokens,
  batch 256, d_model in {64, 128, 256}, lr in logspace(-3, -1.5, 4), 32 epochs, early stop at 0.99.
* ``micro``: seconds; a smoke test of the machinery (accuracies mean nothing).

What the paper presets could and could not verify: the train/test mixes, example counts, vocab,
``random_non_queries``, batch sizes, d_model / lr grids and epoch counts are those of the authors'
released configurations (HazyResearch/zoology: ``experiments/paper_configs/iclr24_zoology_figure2``
and ``arxiv24_based_figure2``), and early stopping at 0.99 validation accuracy, AdamW and a cosine
schedule are in that repository's trainer. Not verified against the PDFs (only abstracts were at
hand): that these configs are exactly the runs plotted. Known differences: Zoology's probe layers
are its own (BaseConv with an implicit long convolution, then the mixer, in *each* of the two
layers, or the mixer alone); here layer 1 is a short depthwise convolution and layer 2 the mixer.
Their lr grid for ``based`` is logspace(-3, -1.5, 4) (kept); their d_model grid differs per
architecture (Based 48-128, Mamba 64-256, attention 64-128), ours is one grid for all. Our
trainer adds warmup, weight decay 0.1 on matrices and gradient clipping at 1.0. Attention runs
without positional encoding (``use_rope=False``, as the Based probes' ``max_position_embeddings=0``:
the convolution gives local order) and Based without its sliding window (``window_size=0``: its
linear branch is under test, as in the papers' probe).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linmix.tasks import IGNORE_INDEX, Batch, mqar, test_seed, train_seed

logger = logging.getLogger(__name__)

# Probe-specific mixer arguments (see the module docstring); user kwargs override them.
PROBE_MIXER_KWARGS: dict[str, dict[str, Any]] = {
    "attention": {"use_rope": False},
    "based": {"window_size": 0},
}

DEFAULT_MIXERS = ("attention", "based", "mamba2", "gated_deltanet", "deltanet", "gla", "linear_attn")


# -- configuration ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MQARSlice:
    """``num_examples`` MQAR examples of ``seq_len`` tokens with ``num_kv_pairs`` pairs each."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def key(self) -> str:
        """Name of the slice in tables and results.json, e.g. ``"L256_kv64"``."""
        return f"L{self.seq_len}_kv{self.num_kv_pairs}"


@dataclass(frozen=True)
class RecallTask:
    """The data of one training run: a train mix, the test slices scored after it, the batch size."""

    train: tuple[MQARSlice, ...]
    test: tuple[MQARSlice, ...]
    batch_size: int


def _slices(pairs: Sequence[tuple[int, int]], num_examples: int | Sequence[int]) -> tuple[MQARSlice, ...]:
    counts = [num_examples] * len(pairs) if isinstance(num_examples, int) else list(num_examples)
    return tuple(MQARSlice(L, kv, n) for (L, kv), n in zip(pairs, counts, strict=True))


@dataclass(frozen=True)
class RecallPreset:
    """Everything a recall benchmark run needs besides the mixers, device and seed.

    Attributes:
        name: preset name.
        tasks: the training runs' data (one run per task, mixer, d_model and lr).
        vocab_size: MQAR vocabulary (keys from the lower half, values from the upper half).
        d_models: model widths to try.
        lrs: learning rates of the sweep (the best is reported).
        epochs: passes over the train data.
        mixers: default mixers to compare.
        power_a: query-gap power law of MQAR.
        random_non_queries: random tokens between the queries (else 0).
        conv_size: window of the short-convolution layer.
        num_heads: heads of every mixer that takes ``num_heads`` (None: each mixer's default).
        mixer_kwargs: extra constructor arguments per mixer (over :data:`PROBE_MIXER_KWARGS`).
        weight_decay, grad_clip: optimizer settings (see :class:`~linmix.train.TrainConfig`).
        early_stopping_threshold: stop a run once the test accuracy reaches this (evaluated each
            epoch); None: train all epochs and evaluate at the end only.
        eval_batch_size: test examples per forward.
    """

    name: str
    tasks: tuple[RecallTask, ...]
    vocab_size: int
    d_models: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: int
    mixers: tuple[str, ...] = DEFAULT_MIXERS
    power_a: float = 0.01
    random_non_queries: bool = True
    conv_size: int = 4
    num_heads: int | None = None
    mixer_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    early_stopping_threshold: float | None = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        def positive_ints(name: str, values: Sequence[int]) -> None:
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"RecallPreset: {name} must be one or more positive ints, got {values!r}")

        positive_ints("d_models", self.d_models)
        positive_ints("epochs", [self.epochs])
        if not self.lrs or any(not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0
                               for lr in self.lrs):
            raise ValueError(f"RecallPreset: lrs must be one or more positive numbers, got {self.lrs!r}")
        if not self.tasks or any(not t.train or not t.test for t in self.tasks):
            raise ValueError("RecallPreset: tasks must hold at least one task, each with train and test slices")
        if not self.mixers:
            raise ValueError("RecallPreset: mixers must name at least one mixer")
        for task in self.tasks:
            for s in task.train + task.test:
                if s.num_kv_pairs > self.vocab_size // 2 - 1 or s.seq_len < 4 * s.num_kv_pairs or s.num_examples < 1:
                    raise ValueError(f"RecallPreset: slice {s} does not fit: num_kv_pairs must be <= "
                                     f"vocab_size // 2 - 1 (vocab_size={self.vocab_size}), seq_len >= "
                                     "4 * num_kv_pairs, num_examples >= 1")

    @property
    def test_slices(self) -> list[MQARSlice]:
        """Every test slice of every task, in order, without repeats."""
        return list(dict.fromkeys(s for task in self.tasks for s in task.test))

    @property
    def max_test_len(self) -> int:
        return max(s.seq_len for s in self.test_slices)

    def replace(self, **changes: Any) -> RecallPreset:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _logspace(start: float, stop: float, num: int) -> tuple[float, ...]:
    """``numpy.logspace(start, stop, num)`` as a tuple of floats."""
    return tuple(10 ** (start + (stop - start) * i / (num - 1)) for i in range(num))


PRESETS: dict[str, RecallPreset] = {
    "quick": RecallPreset(
        name="quick",
        tasks=(RecallTask(train=_slices([(64, 8), (64, 16)], 12_800),
                          test=_slices([(64, 4), (64, 8), (64, 16), (128, 32), (256, 64)], 256),
                          batch_size=32),),
        vocab_size=256, d_models=(64,), lrs=(1e-2,), epochs=1, random_non_queries=False,
        mixers=("attention", "based", "gated_deltanet", "deltanet", "gla", "linear_attn"),
        mixer_kwargs={"based": {"feature_dim": 8}, "gated_deltanet": {"dt_max": 0.01},
                      "mamba2": {"dt_min": 0.1, "dt_max": 1.0, "A_init_range": (0.01, 0.1)}}),
    "zoology": RecallPreset(
        name="zoology",
        tasks=tuple(RecallTask(train=_slices([(L, kv)], 100_000), test=_slices([(L, kv)], 3_000), batch_size=bs)
                    for L, kv, bs in [(64, 4, 512), (128, 8, 512), (256, 16, 256)]),
        vocab_size=8192, d_models=(64, 128, 256, 512), lrs=_logspace(-4, -2, 4),
        epochs=64, random_non_queries=False, early_stopping_threshold=0.99),
    "based": RecallPreset(
        name="based",
        tasks=(RecallTask(
            train=_slices([(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)], [100_000] + [20_000] * 4),
            test=_slices([(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)], 1_000),
            batch_size=256),),
        vocab_size=8192, d_models=(64, 128, 256), lrs=_logspace(-3, -1.5, 4),
        epochs=32, early_stopping_threshold=0.99, eval_batch_size=64),
    "micro": RecallPreset(
        name="micro",
        tasks=(RecallTask(train=_slices([(32, 4)], 64), test=_slices([(32, 4), (64, 8)], 16), batch_size=32),),
        vocab_size=64, d_models=(16,), lrs=(3e-3,), epochs=1, mixers=("attention",), num_heads=2),
}
"""The benchmark presets by name (see the module docstring)."""


def get_preset(name: str) -> RecallPreset:
    """``PRESETS[name]`` with a clear error for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown recall preset {name!r}; available: {sorted(PRESETS)}") from None


# -- the probe model ----------------------------------------------------------------------------------

def probe_config(mixer: str, d_model: int, vocab_size: int, *, conv_size: int = 4, num_heads: int | None = None,
                 mixer_kwargs: Mapping[str, Mapping[str, Any]] | None = None):
    """The LinmixConfig of the two-layer MQAR probe: ``short_conv`` then ``mixer``, no MLP.

    Example:
        >>> probe_config("gla", 64, 512).mixer_types
        ['short_conv', 'gla']
    """
    from linmix.models import LinmixConfig

    kwargs: dict[str, dict[str, Any]] = {"short_conv": {"conv_size": conv_size}}
    for name in dict.fromkeys(["short_conv", mixer]):
        kwargs.setdefault(name, {}).update(PROBE_MIXER_KWARGS.get(name, {}))
        kwargs[name].update((mixer_kwargs or {}).get(name, {}))
    return LinmixConfig(vocab_size=vocab_size, hidden_size=d_model, num_layers=2, layers=["short_conv", mixer],
                        mlp=None, num_heads=num_heads, mixer_kwargs=kwargs)


def state_bytes(model: torch.nn.Module, context_len: int, batch_size: int = 1) -> int:
    """Sum of the mixers' ``state_bytes(context_len, batch_size)`` over the layers of a LinmixForCausalLM."""
    return sum(block.mixer.state_bytes(context_len, batch_size) for block in model.base_model.layers)


def recall_accuracy(model: torch.nn.Module, test_sets: Sequence[tuple[str, Batch]],
                    batch_size: int = 256) -> dict[str, float]:
    """Accuracy at the query positions: per test slice (by name) and over all queries (``"accuracy"``).

    Runs the decoder, then the head only at the labelled positions; call under ``torch.no_grad``.
    """
    head = model.get_output_embeddings()
    out: dict[str, float] = {}
    total_correct, total = 0, 0
    for name, data in test_sets:
        correct = torch.zeros((), dtype=torch.long, device=data.input_ids.device)
        count = 0
        for part in data.split(batch_size):
            hidden = model.base_model(input_ids=part.input_ids, use_cache=False).last_hidden_state
            scored = part.labels != IGNORE_INDEX
            correct += (head(hidden[scored]).argmax(-1) == part.labels[scored]).sum()
            count += int(scored.sum())
        correct_count = int(correct)
        out[name] = correct_count / max(count, 1)
        total_correct += correct_count
        total += count
    out["accuracy"] = total_correct / max(total, 1)
    return out


# -- one run --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecallJob:
    """One training run of the benchmark."""

    mixer: str
    d_model: int
    task: int
    lr: float

    @property
    def run_id(self) -> str:
        return f"{self.mixer}-d{self.d_model}-task{self.task}-lr{self.lr:.2e}"


class RecallRunner:
    """Runs :class:`RecallJob` s on one device, caching each task's data there.

    Args:
        preset: the benchmark configuration.
        device: where to train.
        seed: seeds data (train and test seed ranges are disjoint) and model init.
        log_dir: write each run's JSONL training log there (None: no logs).
        progress: show the trainer's progress bar.
    """

    def __init__(self, preset: RecallPreset, device: str = "cpu", seed: int = 0,
                 log_dir: str | os.PathLike | None = None, progress: bool = False):
        self.preset = preset
        self.device = device
        self.seed = seed
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.progress = progress
        self._data: dict[int, tuple[Any, list[tuple[str, Batch]]]] = {}

    def _mqar(self, s: MQARSlice, seed: int) -> Batch:
        p = self.preset
        return mqar(s.num_examples, vocab_size=p.vocab_size, seq_len=s.seq_len, num_kv_pairs=s.num_kv_pairs,
                    power_a=p.power_a, random_non_queries=p.random_non_queries, seed=seed)

    def data(self, task_index: int):
        """(train BucketedBatches, [(slice name, test Batch)]) of a task, on the device (cached)."""
        from linmix.train import BucketedBatches

        if task_index not in self._data:
            task = self.preset.tasks[task_index]
            base = 1000 * (1000 * self.seed + task_index)
            train = [self._mqar(s, train_seed(base + i)) for i, s in enumerate(task.train)]
            test = [(s.key, self._mqar(s, test_seed(base + i)).to(self.device)) for i, s in enumerate(task.test)]
            self._data[task_index] = (BucketedBatches(train, task.batch_size, seed=self.seed).to(self.device), test)
        return self._data[task_index]

    def build_model(self, mixer: str, d_model: int) -> torch.nn.Module:
        from linmix.models import LinmixForCausalLM

        p = self.preset
        torch.manual_seed(self.seed)
        return LinmixForCausalLM(probe_config(mixer, d_model, p.vocab_size, conv_size=p.conv_size,
                                              num_heads=p.num_heads, mixer_kwargs=p.mixer_kwargs))

    def run(self, job: RecallJob) -> dict[str, Any]:
        """Train and score one job; returns its result record (see :class:`RecallResults`)."""
        from linmix.train import TrainConfig, Trainer, labelled_positions_loss

        p = self.preset
        train, test = self.data(job.task)
        model = self.build_model(job.mixer, job.d_model)
        early = p.early_stopping_threshold is not None
        config = TrainConfig(
            lr=job.lr, weight_decay=p.weight_decay, grad_clip=p.grad_clip, epochs=p.epochs,
            eval_every=None if early else p.epochs * len(train),
            early_stopping_metric="accuracy" if early else None,
            early_stopping_threshold=p.early_stopping_threshold if early else 1.0,
            log_path=None if self.log_dir is None else self.log_dir / f"{job.run_id}.jsonl",
            seed=self.seed, device=self.device, progress=self.progress)
        start = time.perf_counter()
        trainer = Trainer(model, config, train, loss_fn=labelled_positions_loss,
                          eval_fn=lambda m: recall_accuracy(m, test, p.eval_batch_size))
        history = trainer.fit()
        seconds = time.perf_counter() - start
        final_eval = [r for r in history if r["kind"] == "eval"][-1]
        final_train = [r for r in history if r["kind"] == "train"][-1]
        slices = [s.key for s in p.tasks[job.task].test]
        return {
            **dataclasses.asdict(job), "run_id": job.run_id,
            "accuracy": {k: final_eval[k] for k in slices}, "overall_accuracy": final_eval["accuracy"],
            "train_loss": final_train["loss"], "steps": trainer.step, "total_steps": trainer.total_steps,
            "train_seconds": round(seconds, 2),
            "state_bytes": state_bytes(model, p.max_test_len),
            "num_params": sum(t.numel() for t in model.parameters()),
        }


def _worker_main(rank: int, preset: RecallPreset, device: str, seed: int, log_dir: str | None, threads: int,
                 jobs_queue, results_queue) -> None:
    """Body of a worker process: run jobs from the queue until a None arrives."""
    torch.set_num_threads(threads)
    if device.startswith("cuda") and ":" not in device and torch.cuda.device_count() > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    runner = RecallRunner(preset, device=device, seed=seed, log_dir=log_dir)
    while True:
        job = jobs_queue.get()
        if job is None:
            return
        try:
            results_queue.put(("ok", runner.run(job)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            results_queue.put(("error", f"{job.run_id}: {traceback.format_exc()}"))


# -- the benchmark ------------------------------------------------------------------------------------

@dataclass
class RecallResults:
    """Runs of a benchmark and their best-over-lr summary.

    Attributes:
        preset: the configuration that ran.
        mixers: mixers in table order.
        runs: one record per job: mixer, d_model, task, lr, run_id, accuracy (per test slice of the
            task), overall_accuracy, train_loss, steps, total_steps, train_seconds, state_bytes, num_params.
        meta: device, jobs, seed, versions, wall time.
    """

    preset: RecallPreset
    mixers: list[str]
    runs: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def slices(self) -> list[str]:
        return [s.key for s in self.preset.test_slices]

    def best(self) -> list[dict[str, Any]]:
        """Per (mixer, d_model): for each task the run with the best overall accuracy (ties: the
        smaller lr); their per-slice accuracies merged, the lrs, the state size."""
        rows = []
        for mixer in self.mixers:
            for d_model in self.preset.d_models:
                mine = [r for r in self.runs if r["mixer"] == mixer and r["d_model"] == d_model]
                if not mine:
                    continue
                accuracy: dict[str, float] = {}
                lrs = []
                for task in range(len(self.preset.tasks)):
                    runs = [r for r in mine if r["task"] == task]
                    if not runs:
                        continue
                    best = max(runs, key=lambda r: (_nan_low(r["overall_accuracy"]), -r["lr"]))
                    accuracy.update(best["accuracy"])
                    lrs.append(best["lr"])
                rows.append({"mixer": mixer, "d_model": d_model, "state_bytes": mine[0]["state_bytes"],
                             "num_params": mine[0]["num_params"], "accuracy": accuracy,
                             "mean_accuracy": sum(accuracy.values()) / len(accuracy), "lr": lrs})
        return rows

    def table(self) -> str:
        """Markdown table: one row per (mixer, d_model), accuracy per test slice (best over lr)."""
        slices = self.slices
        head = ["mixer", "d_model", "state bytes", *[k.replace("_", " ") for k in slices], "mean", "lr"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.best():
            accs = [f"{row['accuracy'][k]:.3f}" if k in row["accuracy"] else "-" for k in slices]
            lrs = "/".join(f"{lr:.1e}" for lr in row["lr"])
            lines.append(f"| {row['mixer']} | {row['d_model']} | {row['state_bytes']:,} | " + " | ".join(accs)
                         + f" | {row['mean_accuracy']:.3f} | {lrs} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "settings": self.preset.to_dict(), "mixers": self.mixers,
                "slices": self.slices, **self.meta, "best": self.best(), "runs": self.runs}

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``results.json`` (and ``recall.png`` when matplotlib is installed); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        written = [path]
        plot = self.plot(out / "recall.png")
        if plot is not None:
            written.append(plot)
        return written

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Accuracy against state size, one panel per test slice; None (one log line) without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib is not installed (pip install 'linmix[plot]'): skipped the plot")
            return None
        rows, slices = self.best(), self.slices
        cols = min(4, len(slices))
        nrows = math.ceil(len(slices) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False, sharey=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, key in enumerate(slices):
            ax = axes[i // cols][i % cols]
            for j, mixer in enumerate(self.mixers):
                pts = sorted((r["state_bytes"], r["accuracy"][key]) for r in rows
                             if r["mixer"] == mixer and key in r["accuracy"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[j % len(colors)], label=mixer)
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(key.replace("_", " "), fontsize=9)
            ax.grid(alpha=0.3)
            if i % cols == 0:
                ax.set_ylabel("accuracy")
            if i + cols >= len(slices):  # no panel below this one
                ax.set_xlabel("state bytes")
        for i in range(len(slices), nrows * cols):
            axes[i // cols][i % cols].axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if len(slices) < nrows * cols:  # a free panel holds the legend
            axes[-1][-1].legend(handles, labels, loc="center", fontsize=8, title="mixer")
            fig.tight_layout(rect=(0, 0, 1, 0.95))
        else:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
            fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        fig.suptitle(f"MQAR recall ({self.preset.name} preset): accuracy vs recurrent state size", fontsize=10)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def check_run(preset: RecallPreset, mixers: Sequence[str] | None, device: str, jobs: int) -> list[str]:
    """Validate the arguments of :func:`run_recall` (ValueError naming the bad one); returns the mixers."""
    from linmix.layers import MIXERS

    mixers = list(preset.mixers if mixers is None else mixers)
    unknown = [m for m in mixers if m not in MIXERS]
    if not mixers or unknown:
        raise ValueError(f"unknown mixers {unknown}; available: {sorted(MIXERS)}" if unknown
                         else "mixers must name at least one mixer")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    for mixer in dict.fromkeys(mixers):  # configuration errors now, not inside a worker
        for d_model in preset.d_models:
            probe_config(mixer, d_model, preset.vocab_size, conv_size=preset.conv_size, num_heads=preset.num_heads,
                         mixer_kwargs=preset.mixer_kwargs)
    return mixers


def run_recall(preset: RecallPreset | str, *, mixers: Sequence[str] | None = None, device: str = "cpu",
               jobs: int = 1, seed: int = 0, out_dir: str | os.PathLike | None = None, progress: bool = False,
               on_result: Callable[[dict[str, Any]], None] | None = None, resume: bool = False) -> RecallResults:
    """Train and score every (mixer, d_model, task, lr) of a preset; optionally save the results.

    Args:
        preset: a :class:`RecallPreset` or a name in :data:`PRESETS`.
        mixers: mixers to compare (registered names); default ``preset.mixers``.
        device: "cpu" or "cuda" ("cuda:i" pins one GPU; plain "cuda" spreads workers over all).
        jobs: trainings run at once, each in its own process (own CUDA context; on the CPU each
            gets ``threads // jobs`` threads). 1 runs everything in this process.
        seed: data and init seed.
        out_dir: write ``results.json``, ``recall.png`` and per-run JSONL logs (``logs/``) there.
        progress: show each run's training progress bar (in-process runs only).
        on_result: called with each run's record as it finishes (e.g. to advance a progress bar).
        resume: reuse the run records an earlier call with the same ``out_dir`` left in
            ``runs/`` (each run's record is written there as it finishes, so an interrupted
            benchmark continues where it stopped); records of other settings are ignored.

    Returns:
        The :class:`RecallResults`; ``results.table()`` is the markdown table.

    Raises:
        RuntimeError: after every other run has finished (and the results are saved), when a
            run failed; the message holds each failed run's traceback.

    Example:
        >>> results = run_recall("micro")
        >>> results.slices, sorted(results.best()[0])[:3]
        (['L32_kv4', 'L64_kv8'], ['accuracy', 'd_model', 'lr'])
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    mixers = check_run(preset, mixers, device, jobs)
    log_dir = None if out_dir is None else Path(out_dir) / "logs"
    all_jobs = [RecallJob(m, d, t, float(lr)) for d in sorted(preset.d_models, reverse=True) for m in mixers
                for t in range(len(preset.tasks)) for lr in preset.lrs]  # widest first: better packing

    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    run_dir = None if out_dir is None else Path(out_dir) / "runs"
    fingerprint = _fingerprint(preset, seed)
    if resume and run_dir is not None:
        done = _load_runs(run_dir, fingerprint, {job.run_id for job in all_jobs})
        runs.extend(done.values())
        all_jobs_left = [job for job in all_jobs if job.run_id not in done]
        logger.info("recall: resuming, %d of %d runs already done", len(done), len(all_jobs))
    else:
        all_jobs_left = all_jobs

    def collect(record: dict[str, Any]) -> None:
        runs.append(record)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / f"{record['run_id']}.json.tmp"
            tmp.write_text(json.dumps({**record, "fingerprint": fingerprint}) + "\n")
            tmp.replace(run_dir / f"{record['run_id']}.json")
        if on_result is not None:
            on_result(record)

    if jobs == 1:
        runner = RecallRunner(preset, device=device, seed=seed, log_dir=log_dir, progress=progress)
        for job in all_jobs_left:
            try:
                record = runner.run(job)
            except Exception:  # noqa: BLE001 - the other runs go on; raised below
                failures.append(f"{job.run_id}: {traceback.format_exc()}")
                continue
            collect(record)
    elif all_jobs_left:
        _run_in_processes(preset, all_jobs_left, device, seed, log_dir, jobs, collect, failures.append)

    order = {job.run_id: i for i, job in enumerate(all_jobs)}
    runs.sort(key=lambda r: order[r["run_id"]])
    results = RecallResults(preset, mixers, runs, meta={
        "device": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu",
        "jobs": jobs, "seed": seed, "threads_per_job": _threads_per_job(device, jobs), "torch": torch.__version__,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_seconds_total": round(sum(r["train_seconds"] for r in runs), 1)})
    if out_dir is not None and runs:
        results.save(out_dir)
    if failures:
        raise RuntimeError(f"recall: {len(failures)} of {len(all_jobs)} training runs failed (the others are in "
                           f"{out_dir or 'the results'}):\n" + "\n".join(failures))
    return results


def _fingerprint(preset: RecallPreset, seed: int) -> str:
    """What a run record depends on besides its job: the preset's settings and the seed."""
    import hashlib

    blob = json.dumps({"settings": preset.to_dict(), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_runs(run_dir: Path, fingerprint: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The run records in ``run_dir`` of these settings (fingerprint) and wanted jobs, by run id."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.glob("*.json")) if run_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.pop("fingerprint", None) == fingerprint and record.get("run_id") in wanted:
            done[record["run_id"]] = record
    return done


def _threads_per_job(device: str, jobs: int) -> int:
    """torch threads of each training: this process's share of its threads on the CPU, 1 beside a GPU."""
    if device.startswith("cuda"):
        return 1 if jobs > 1 else torch.get_num_threads()
    return max(1, torch.get_num_threads() // jobs)


def _run_in_processes(preset: RecallPreset, all_jobs: list[RecallJob], device: str, seed: int,
                      log_dir: Path | None, jobs: int, collect: Callable[[dict[str, Any]], None],
                      fail: Callable[[str], None]) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh CUDA context per worker
    jobs = min(jobs, len(all_jobs))
    job_queue, result_queue = ctx.Queue(), ctx.Queue()
    for job in all_jobs:
        job_queue.put(job)
    for _ in range(jobs):
        job_queue.put(None)
    threads = _threads_per_job(device, jobs)
    workers = [ctx.Process(target=_worker_main, daemon=True,
                           args=(rank, preset, device, seed, None if log_dir is None else str(log_dir), threads,
                                 job_queue, result_queue)) for rank in range(jobs)]
    for w in workers:
        w.start()
    try:
        for _ in range(len(all_jobs)):
            while True:
                try:
                    status, payload = result_queue.get(timeout=5.0)
                    break
                except queue.Empty:  # check that the workers are alive
                    if not any(w.is_alive() for w in workers):
                        raise RuntimeError("recall: every worker process exited before finishing its jobs") from None
            if status == "error":
                fail(payload)
            else:
                collect(payload)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(timeout=5.0)
