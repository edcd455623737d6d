"""RMS normalisation and its gated form (the output norm of GLA, Mamba-2, Gated DeltaNet, ...).

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight

computed in float32 (float64 for float64 inputs) and returned in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_GATE_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "sigmoid": torch.sigmoid}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_input(cls: str, arg: str, x: object, hidden_size: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{cls}: {arg} must be a floating tensor of shape [..., {hidden_size}], got {got}")
    if x.dim() == 0 or x.shape[-1] != hidden_size:
        raise ValueError(f"{cls}: {arg} must have shape [..., hidden_size={hidden_size}], got {list(x.shape)}")
    return x


def _rms_normalize(x: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x / rms(x) over the last axis (or over groups of ``group_size`` features of it)."""
    if group_size is None or group_size == x.shape[-1]:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    g = x.unflatten(-1, (-1, group_size))
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019).

    ``y = x / sqrt(mean(x^2, -1) + eps) * weight``, computed in float32 and returned in x's dtype.

    Args:
        hidden_size: size D of the normalised last axis.
        eps: added to the mean square.
        elementwise_affine: learn a per-feature scale ``weight`` (initialised to ones).

    Shapes:
        x: [..., D] -> [..., D].

    Example:
        >>> import torch
        >>> norm = RMSNorm(64)
        >>> norm(torch.randn(2, 10, 64, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.hidden_size = _check_size("RMSNorm: hidden_size", hidden_size)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("RMSNorm", "x", x, self.hidden_size)
        y = _rms_normalize(x.to(_compute_dtype(x)), self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a multiplicative output gate: the output norm of GLA, Mamba-2, Gated DeltaNet.

    With ``norm_before_gate=True`` (GLA, Gated DeltaNet):
        ``y = RMSNorm(x) * act(gate)``
    with ``norm_before_gate=False`` (the Mamba-2 layer's setting):
        ``y = RMSNorm(x * act(gate))``.

    Computed in float32 (float64 for float64 inputs), returned in x's dtype.

    Args:
        hidden_size: size D of the last axis of x and gate.
        eps: added to the mean square (1e-5, as in Mamba-2 and GLA).
        activation: gate nonlinearity, ``"silu"`` (alias ``"swish"``) or ``"sigmoid"``.
        elementwise_affine: learn a per-feature scale ``weight`` (initialised to ones).
        norm_before_gate: normalise then gate (True) or gate then normalise (False).
        group_size: normalise groups of this many features separately (Mamba-2 with
            ``ngroups > 1`` uses ``d_ssm // ngroups``); ``None`` = the whole axis.

    Shapes:
        x: [..., D], gate: [..., D] -> [..., D].

    Example:
        >>> import torch
        >>> norm = GatedRMSNorm(64)
        >>> o, g = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
        >>> norm(o, g).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "silu",
                 elementwise_affine: bool = True, norm_before_gate: bool = True,
                 group_size: int | None = None):
        super().__init__()
        self.hidden_size = _check_size("GatedRMSNorm: hidden_size", hidden_size)
        if activation not in _GATE_ACTIVATIONS:
            raise ValueError(f"GatedRMSNorm: activation must be one of {sorted(_GATE_ACTIVATIONS)}, "
                             f"got {activation!r}")
        if group_size is not None:
            _check_size("GatedRMSNorm: group_size", group_size)
            if hidden_size % group_size:
                raise ValueError(f"GatedRMSNorm: group_size ({group_size}) must divide hidden_size "
                                 f"({hidden_size})")
        self.eps = float(eps)
        self.activation = activation
        self.elementwise_affine = elementwise_affine
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, activation={self.activation!r}, "
                f"norm_before_gate={self.norm_before_gate}, group_size={self.group_size}")

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Normalise x and gate it.

        Args:
            x: [..., D] the values to normalise (e.g. the token mixer's output).
            gate: [..., D] the gate pre-activation, same shape as x.

        Returns:
            [..., D] in x's dtype.
        """
        _check_input("GatedRMSNorm", "x", x, self.hidden_size)
        _check_input("GatedRMSNorm", "gate", gate, self.hidden_size)
        if gate.shape != x.shape:
            raise ValueError(f"GatedRMSNorm: gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
        dtype = _compute_dtype(x)
        xf, g = x.to(dtype), _GATE_ACTIVATIONS[self.activation](gate.to(dtype))
        weight = None if self.weight is None else self.weight.to(dtype)
        if self.norm_before_gate:
            y = _rms_normalize(xf, self.eps, self.group_size)
            if weight is not None:
                y = y * weight
            y = y * g
        else:
            y = _rms_normalize(xf * g, self.eps, self.group_size)
            if weight is not None:
                y = y * weight
        return y.to(x.dtype)
