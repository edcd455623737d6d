"""Channel mixers (the MLP half of a block): gated (SwiGLU / GeGLU) and plain two-layer MLPs.

    SwiGLU(x) = W_down( act(W_gate x) * (W_up x) )          (Shazeer, "GLU Variants", 2020)
    MLP(x)    = W_2( act(W_1 x) )

``SwiGLU``'s default width follows LLaMA: 8/3 * hidden_size keeps the parameter count of a 4x
plain MLP (three matrices instead of two), rounded *up* to a multiple of ``multiple_of`` (32 by
default, so small models are not padded by much; LLaMA used 256) for efficient matmul tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


def _check_activation(cls: str, activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{cls}: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    return _ACTIVATIONS[activation]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 32) -> int:
    """ceil(8/3 * hidden_size / multiple_of) * multiple_of.

    Example:
        >>> swiglu_intermediate_size(512), swiglu_intermediate_size(4096, multiple_of=256)
        (1376, 11008)
    """
    _check_size("swiglu_intermediate_size: hidden_size", hidden_size)
    _check_size("swiglu_intermediate_size: multiple_of", multiple_of)
    return multiple_of * -(-8 * hidden_size // (3 * multiple_of))  # exact integer ceil


class SwiGLU(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU with ``activation="silu"``, GeGLU with "gelu".

    Projection names (``gate_proj``, ``up_proj``, ``down_proj``) follow LLaMA, so converted
    checkpoints load by name.

    Args:
        hidden_size: model width D.
        intermediate_size: inner width; ``None`` = :func:`swiglu_intermediate_size`
            (8/3 * D rounded up to a multiple of ``multiple_of``).
        multiple_of: rounding of the default intermediate size.
        bias: biases on the three projections.
        activation: the gate nonlinearity (``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``,
            ``"relu2"``).

    Shapes:
        x: [..., D] -> [..., D].

    Example:
        >>> import torch
        >>> mlp = SwiGLU(512)
        >>> mlp.intermediate_size
        1376
        >>> mlp(torch.randn(2, 10, 512)).shape
        torch.Size([2, 10, 512])
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None = None, multiple_of: int = 32,
                 bias: bool = False, activation: str = "silu"):
        super().__init__()
        _check_size("SwiGLU: hidden_size", hidden_size)
        if intermediate_size is None:
            intermediate_size = swiglu_intermediate_size(hidden_size, multiple_of)
        _check_size("SwiGLU: intermediate_size", intermediate_size)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self._act = _check_activation("SwiGLU", activation)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SwiGLU: x must have shape [..., hidden_size={self.hidden_size}], got {got}")
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """Plain two-layer MLP ``fc2(act(fc1(x)))`` (GPT-2 style).

    Args:
        hidden_size: model width D.
        intermediate_size: inner width; ``None`` = 4 * D.
        bias: biases on both projections.
        activation: the nonlinearity (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"relu2"``, ``"silu"``).

    Shapes:
        x: [..., D] -> [..., D].

    Example:
        >>> import torch
        >>> MLP(64)(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None = None, bias: bool = True,
                 activation: str = "gelu"):
        super().__init__()
        _check_size("MLP: hidden_size", hidden_size)
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        _check_size("MLP: intermediate_size", intermediate_size)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self._act = _check_activation("MLP", activation)
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MLP: x must have shape [..., hidden_size={self.hidden_size}], got {got}")
        return self.fc2(self._act(self.fc1(x)))


# name -> (class, fixed keyword arguments)
MLPS: dict[str, tuple[type[nn.Module], dict[str, object]]] = {
    "swiglu": (SwiGLU, {"activation": "silu"}),
    "geglu": (SwiGLU, {"activation": "gelu"}),
    "gelu": (MLP, {"activation": "gelu"}),
    "relu": (MLP, {"activation": "relu"}),
    "relu2": (MLP, {"activation": "relu2"}),
}


def get_mlp(name: str, hidden_size: int, intermediate_size: int | None = None, **kwargs) -> nn.Module:
    """Build a channel mixer by name: one of ``MLPS`` ("swiglu", "geglu", "gelu", "relu", "relu2").

    Example:
        >>> type(get_mlp("swiglu", 256)).__name__
        'SwiGLU'
    """
    if name not in MLPS:
        raise ValueError(f"get_mlp: unknown MLP {name!r}; valid names: {', '.join(sorted(MLPS))}")
    cls, fixed = MLPS[name]
    clash = set(fixed) & set(kwargs)
    if clash:
        raise ValueError(f"get_mlp: {name!r} fixes {sorted(clash)}; do not pass them")
    return cls(hidden_size, intermediate_size, **fixed, **kwargs)
