"""Stage 2: end-to-end distillation of the student into the teacher, through LoRA by default.

After attention transfer every layer matches its teacher layer on the teacher's inputs; stacked,
their small errors compound. Stage 2 trains the whole student against the teacher's next-token
distribution (KL(teacher || student) per token, LoLCATs / RADLADS step 2) and/or the text itself
(next-token cross-entropy), updating low-rank adapters (LoRA, via ``peft``) on the q/k/v/o
projections (``in_proj`` / ``out_proj`` for Mamba-2) of every layer, which are merged back at the
end so the result is a plain :class:`~linmix.models.LinmixForCausalLM`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

#: LoRA target module names: attention projections, and Mamba-2's in/out projections.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj")
LOSSES = ("kl", "ce", "kl+ce")


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2 per position, float32 [...].

    Example:
        >>> logits = torch.randn(2, 5, 11)
        >>> bool(kl_per_token(logits, logits).abs().max() < 1e-6)
        True
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature ** 2


class DistillationLoss:
    """Stage-2 loss for :class:`~linmix.train.Trainer`: ``loss_fn(student, batch) -> (loss, metrics)``.

    Args:
        teacher: the frozen teacher (run under ``no_grad`` on every batch).
        loss: ``"kl"`` (KL to the teacher's next-token distribution, mean over positions),
            ``"ce"`` (next-token cross-entropy on the text) or ``"kl+ce"`` (their sum,
            the CE weighted by ``ce_weight``).
        temperature: softmax temperature of the KL.
        ce_weight: weight of the CE term in ``"kl+ce"``.

    Metrics: ``kl``, ``ce`` and ``agreement`` (top-1 next token equal to the teacher's).
    """

    def __init__(self, teacher: nn.Module, loss: str = "kl", *, temperature: float = 1.0, ce_weight: float = 1.0):
        if loss not in LOSSES:
            raise ValueError(f"DistillationLoss: loss must be one of {LOSSES}, got {loss!r}")
        self.teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.loss, self.temperature, self.ce_weight = loss, float(temperature), float(ce_weight)

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        # A term that is only a metric (CE under "kl", KL under "ce") is computed without a graph:
        # its vocabulary-sized float32 intermediates are then not kept for the backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.loss != "ce"):
            kl = kl_per_token(logits, teacher_logits, self.temperature).mean()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.loss != "kl"):
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        loss = {"kl": kl, "ce": ce, "kl+ce": kl + self.ce_weight * ce}[self.loss]
        return loss, {"kl": kl.detach(), "ce": ce.detach(), "agreement": agreement}


def add_lora(student: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, layers: Sequence[int] | None = None):
    """Wrap ``student`` with LoRA adapters (``peft``) on the linear layers named ``target_modules``
    (those the model has) in decoder layers ``layers`` (default all). Everything else is frozen.

    Returns:
        The ``peft`` model (call ``merge_and_unload()`` for the plain model with merged weights).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is in the convert extra
        raise ImportError("stage 2 with LoRA needs peft: pip install linmix[convert]") from err
    present = {name.rsplit(".", 1)[-1] for name, m in student.named_modules() if isinstance(m, nn.Linear)}
    chosen = [t for t in target_modules if t in present]
    if not chosen:
        raise ValueError(f"add_lora: none of {list(target_modules)} is a linear layer of the student")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen, bias="none",
                        layers_to_transform=None if layers is None else list(layers),
                        layers_pattern=None if layers is None else "layers")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(student, config)


def distill(student: nn.Module, teacher: nn.Module, train_data, config, *, loss: str = "kl",
            lora_rank: int = 8, lora_alpha: float = 16.0, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
            extra_params: Iterable[nn.Parameter] = (), temperature: float = 1.0,
            eval_fn=None, max_seconds: float | None = None,
            fit_schedule: bool = False) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run stage 2 with :class:`~linmix.train.Trainer`.

    Args:
        student: the :class:`~linmix.models.LinmixForCausalLM` after stage 1 (trained in place).
        teacher: the teacher (frozen).
        train_data: a :class:`~linmix.tasks.Batch` of token chunks or an iterable of dicts with
            ``"input_ids"``.
        config: a :class:`~linmix.train.TrainConfig`.
        loss: ``"kl"``, ``"ce"`` or ``"kl+ce"`` (:class:`DistillationLoss`).
        lora_rank: rank of the LoRA adapters; 0 = no LoRA, train ``extra_params`` only.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        lora_targets: names of the linear layers that get adapters.
        extra_params: further parameters to train fully (e.g. the feature maps of stage 1).
        temperature: of the KL.
        eval_fn: passed to the Trainer (runs on the student, LoRA applied).
        max_seconds: wall-clock budget of the stage from this call on: training stops after the
            step in progress when it is spent (at least one step runs). None = no limit.
        fit_schedule: with ``max_seconds``, plan the learning-rate schedule over the steps that fit
            in the budget (see :class:`~linmix.convert.budget.MeteredLoss`).

    Returns:
        (the student with the LoRA updates merged -- a plain LinmixForCausalLM --, the history),
        whose last record (kind ``"summary"``) counts the steps and tokens trained, their time and
        throughput, and whether the budget stopped training.
    """
    from linmix.convert.budget import MeteredLoss, fit_within_budget
    from linmix.train import Trainer

    extra = list(extra_params)
    meter = MeteredLoss(DistillationLoss(teacher, loss, temperature=temperature), max_seconds,
                        fit_schedule=fit_schedule)
    teacher.to(config.device)
    if lora_rank:
        model = add_lora(student, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        params = [p for p in model.parameters() if p.requires_grad] + extra
    else:
        if not extra:
            raise ValueError("distill: lora_rank=0 needs extra_params (nothing would be trained)")
        model, params = student, extra
    for p in extra:
        p.requires_grad_(True)
    trainer = Trainer(model, config, train_data, loss_fn=meter, params=params, eval_fn=eval_fn)
    history = fit_within_budget(trainer, meter)
    if lora_rank:
        student = model.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval(), history
