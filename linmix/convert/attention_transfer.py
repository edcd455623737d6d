"""Stage 1, attention transfer: train each converted mixer to reproduce its teacher layer's output.

For every converted layer i, the teacher's own input to its attention, x_i (the normed hidden
states, read by a forward hook), goes through the student mixer, and the loss is the mean squared
error against the teacher attention's output y_i (LoLCATs / Hedgehog "attention transfer",
RADLADS step 1). Layers are independent -- each sees the teacher's inputs, not the previous
student layer's -- so they train together in one pass of the teacher, and the teacher stops after
the last converted layer (no LM head, no later layers). Only the mixers hold gradients.

The loss of a layer is its *relative* MSE, ||y_student - y_teacher||^2 / ||y_teacher||^2 over the
batch, so layers whose outputs differ in scale weigh alike; the training loss is the mean over the
converted layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from linmix.convert.adapters import TeacherAdapter, get_adapter
from linmix.layers import TokenMixer


class _StopForward(Exception):
    """Raised by the last hook: the rest of the teacher is not needed."""


class AttentionTransfer(nn.Module):
    """The frozen teacher and the student mixers of the converted layers, for stage 1.

    ``forward(input_ids)`` returns ``{layer: (student output, teacher output)}``, both [B, T, D].
    The teacher stays in eval mode (no dropout) and frozen whatever ``train()`` is called with.

    Args:
        teacher: a supported Hugging Face causal LM.
        mixers: ``{layer index: mixer}`` (e.g. :func:`~linmix.convert.targets.student_mixers` of a
            student, whose layers are then trained in place, or :func:`~linmix.convert.targets.build_mixers`).
        adapter: the teacher's adapter (default: looked up).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from linmix.convert.targets import build_mixers
        >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                        num_hidden_layers=2, num_attention_heads=2))
        >>> transfer = AttentionTransfer(teacher, build_mixers(teacher, ["keep", "hedgehog"]))
        >>> loss, metrics = transfer_loss(transfer, {"input_ids": torch.randint(0, 32, (2, 8))})
        >>> sorted(metrics)
        ['rel_mse/1']
    """

    def __init__(self, teacher: nn.Module, mixers: Mapping[int, TokenMixer], *,
                 adapter: TeacherAdapter | None = None):
        super().__init__()
        if not mixers:
            raise ValueError("AttentionTransfer: mixers is empty (no layer to convert)")
        self.adapter = adapter or get_adapter(teacher)
        self.teacher = teacher
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.layers = sorted(mixers)
        for i in self.layers:
            if not 0 <= i < self.adapter.num_layers:
                raise ValueError(f"AttentionTransfer: layer {i} is outside the teacher's {self.adapter.num_layers}")
        self.mixers = nn.ModuleDict({str(i): mixers[i] for i in self.layers})
        # A teacher output bias (GPT-2's c_proj) is a constant that the mixer need not learn.
        self._output_bias = {i: self.adapter.attention_weights(i).o_bias for i in self.layers}
        self.teacher.eval()

    def train(self, mode: bool = True) -> AttentionTransfer:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_io(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (attention input, attention output)}`` of the teacher on ``input_ids`` [B, T]."""
        records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        last = self.layers[-1]

        def hook(layer: int):
            def record(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                records[layer] = (x.detach(), y.detach())
                if layer == last:
                    raise _StopForward

            return record

        handles = [self.adapter.attention_module(i).register_forward_hook(hook(i), with_kwargs=True)
                   for i in self.layers]
        try:
            self.teacher(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(self.layers) - set(records))
        if missing:
            raise RuntimeError(f"AttentionTransfer: the teacher's forward never reached layers {missing}")
        return records

    def forward(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        io = self.teacher_io(input_ids)
        out = {}
        for i in self.layers:
            x, y_teacher = io[i]
            y, _ = self.mixers[str(i)](x.to(self._mixer_dtype(i)))
            bias = self._output_bias[i]
            if bias is not None:
                y = y + bias
            out[i] = (y, y_teacher)
        return out

    def _mixer_dtype(self, layer: int) -> torch.dtype:
        return next(self.mixers[str(layer)].parameters()).dtype


def relative_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||y - target||^2 / ||target||^2 in float32 (a scalar tensor)."""
    y, target = y.float(), target.float()
    return (y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def transfer_loss(model: AttentionTransfer, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Stage-1 loss for :class:`~linmix.train.Trainer`: the mean over converted layers of their
    relative MSE; the metrics hold each layer's (``rel_mse/<layer>``)."""
    outputs = model(batch["input_ids"])
    errors = {i: relative_mse(y, y_teacher) for i, (y, y_teacher) in outputs.items()}
    loss = torch.stack(list(errors.values())).mean()
    return loss, {f"rel_mse/{i}": e.detach() for i, e in errors.items()}


@torch.no_grad()
def layer_errors(model: AttentionTransfer, batches: Iterable[Mapping[str, torch.Tensor]] | torch.Tensor,
                 *, batch_size: int = 8) -> dict[int, float]:
    """Relative MSE of every converted layer on held-out data (summed over all of it).

    Args:
        batches: dicts with ``"input_ids"`` [B, T], or one [N, T] tensor cut into ``batch_size`` rows.

    Returns:
        ``{layer: ||y_student - y_teacher||^2 / ||y_teacher||^2}``.
    """
    if isinstance(batches, torch.Tensor):
        batches = [{"input_ids": chunk} for chunk in batches.split(batch_size)]
    was_training = model.training
    model.eval()
    device = next(model.mixers.parameters()).device
    err = {i: 0.0 for i in model.layers}
    ref = {i: 0.0 for i in model.layers}
    try:
        for batch in batches:
            for i, (y, y_teacher) in model(batch["input_ids"].to(device)).items():
                err[i] += float((y.float() - y_teacher.float()).pow(2).sum())
                ref[i] += float(y_teacher.float().pow(2).sum())
    finally:
        model.train(was_training)
    return {i: err[i] / max(ref[i], 1e-30) for i in model.layers}


def attention_transfer(teacher: nn.Module, mixers: Mapping[int, TokenMixer], train_data, config, *,
                       params: Iterable[nn.Parameter] | None = None, eval_data: torch.Tensor | None = None,
                       adapter: TeacherAdapter | None = None, max_seconds: float | None = None,
                       fit_schedule: bool = False) -> dict:
    """Run stage 1 with :class:`~linmix.train.Trainer`.

    Args:
        teacher: the teacher model (frozen here).
        mixers: ``{layer: mixer}`` to train (in place).
        train_data: what the Trainer takes: a :class:`~linmix.tasks.Batch` of token chunks (see
            :func:`linmix.convert.data.lm_batch`) or an iterable of dicts with ``"input_ids"``.
        config: a :class:`~linmix.train.TrainConfig` (use ``weight_decay=0``: the feature maps
            start at the identity and should not be pulled to 0).
        params: the parameters to train (default: every mixer parameter; see
            :func:`~linmix.convert.targets.stage1_parameters`).
        eval_data: held-out token chunks [N, T]: per-layer errors before and after training.
        max_seconds: wall-clock budget of the stage from this call on (the "before" evaluation
            included, the "after" one not): training stops after the step in progress when it is
            spent (at least one step runs). None = no limit.
        fit_schedule: with ``max_seconds``, plan the learning-rate schedule over the steps that fit
            in the budget (see :class:`~linmix.convert.budget.MeteredLoss`).

    Returns:
        ``{"history": trainer records, "before": {layer: rel_mse}, "after": {layer: rel_mse},
        "summary": ...}`` (``before`` / ``after`` empty without ``eval_data``); ``summary`` (also
        the last history record) counts the steps and tokens trained, their time and throughput,
        and whether the budget stopped training (:meth:`~linmix.convert.budget.MeteredLoss.summary`).
    """
    from linmix.convert.budget import MeteredLoss, fit_within_budget
    from linmix.train import Trainer

    meter = MeteredLoss(transfer_loss, max_seconds, fit_schedule=fit_schedule)
    model = AttentionTransfer(teacher, mixers, adapter=adapter)
    params = list(model.mixers.parameters()) if params is None else list(params)
    chosen = {id(p) for p in params}
    for p in model.mixers.parameters():
        p.requires_grad_(id(p) in chosen)
    model.to(config.device)
    before = layer_errors(model, eval_data, batch_size=config.batch_size) if eval_data is not None else {}
    trainer = Trainer(model, config, train_data, loss_fn=meter, params=params)
    history = fit_within_budget(trainer, meter)
    after = layer_errors(model, eval_data, batch_size=config.batch_size) if eval_data is not None else {}
    for p in model.mixers.parameters():
        p.requires_grad_(True)
    return {"history": history, "before": before, "after": after, "summary": history[-1]}
