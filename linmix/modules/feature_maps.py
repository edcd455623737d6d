"""Feature maps phi for kernelised (linear) attention.

Linear attention replaces softmax(q.k) by a kernel phi(q).phi(k), so that the causal sum
sum_{j<=t} phi(q_t).phi(k_j) v_j can be carried in a [D', V] state (the ``linear_attn`` op family).
Each map here is an ``nn.Module`` applied to q and k of shape [..., D] (typically [B, T, H, D]),
returning [..., D'] with ``D' = phi.feature_dim``. Maps that need token positions (cosFormer) set
``needs_positions = True`` and take ``positions=`` in ``forward``.

Maps that involve exponentials or softmax compute in float32 (float64 for float64 inputs) and
return the input's dtype. None of them folds in the attention scale: the Taylor and Performer maps
already contain their 1/sqrt(d) factors, so call the op with ``scale=1.0`` after them.

Build one by name with :func:`get_feature_map`; ``FEATURE_MAPS`` lists the names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.ops.common.checks import values_checked


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_positive_int(cls: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")
    return value


class FeatureMap(nn.Module):
    """Base class: holds ``head_dim`` (D, the input size) and ``feature_dim`` (D', the output size).

    Args:
        head_dim: the size D of the last axis of the inputs.
    """

    needs_positions: bool = False

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = _check_positive_int(type(self).__name__, "head_dim", head_dim)
        self.feature_dim = head_dim

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, feature_dim={self.feature_dim}"

    def _check(self, x: object) -> torch.Tensor:
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{cls}: x must be a floating tensor of shape [..., head_dim={self.head_dim}], got {got}")
        if x.dim() == 0 or x.shape[-1] != self.head_dim:
            raise ValueError(f"{cls}: x must have shape [..., head_dim={self.head_dim}], got {list(x.shape)}")
        return x


class IdentityFeatureMap(FeatureMap):
    """phi(x) = x: plain (unnormalised) linear attention, as in RetNet, GLA, DeltaNet.

    Example:
        >>> import torch
        >>> IdentityFeatureMap(16)(torch.randn(2, 5, 4, 16)).shape
        torch.Size([2, 5, 4, 16])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._check(x)


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., "Transformers are RNNs", 2020).

    Example:
        >>> import torch
        >>> bool((EluFeatureMap(16)(torch.randn(2, 5, 4, 16)) > 0).all())
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self._check(x)) + 1


class ReluFeatureMap(FeatureMap):
    """phi(x) = max(x, 0) (e.g. the cosFormer / "Efficient Attention" non-negative map).

    Example:
        >>> import torch
        >>> bool((ReluFeatureMap(16)(torch.randn(2, 5, 4, 16)) >= 0).all())
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._check(x))


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor expansion of exp(q.k / sqrt(d)) (Based: "Simple linear attention
    language models balance the recall-throughput tradeoff", Arora et al., 2024).

        phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]        D' = 1 + d + d^2

    so that, exactly,

        phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)  ~  exp(q.k / sqrt(d)),

    which is positive for every q, k (1 + s + s^2/2 > 0). The 1/sqrt(d) softmax scale is inside
    phi: use the linear-attention op with ``scale=1.0``. Based projects q, k to a small
    ``head_dim`` (16) first because D' grows as d^2.

    Args:
        head_dim: d.

    Example:
        >>> import torch
        >>> phi = TaylorFeatureMap(16)
        >>> phi.feature_dim
        273
        >>> q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        >>> s = q @ k / 4
        >>> bool(torch.isclose(phi(q) @ phi(k), 1 + s + s * s / 2))
        True
    """

    def __init__(self, head_dim: int):
        super().__init__(head_dim)
        self.feature_dim = 1 + head_dim + head_dim * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        d = self.head_dim
        x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) * (2 * d) ** -0.5
        return torch.cat([x.new_ones(*x.shape[:-1], 1), x * d ** -0.25, x2], dim=-1)


class HedgehogFeatureMap(FeatureMap):
    """Learnable softmax-mimicking map (Hedgehog: "The Hedgehog & the Porcupine", Zhang et al., 2024).

        z = x W (+ b),    phi(x) = [softmax(z), softmax(-z)]        D' = 2 * num_features

    Each half is a softmax over its ``num_features`` features (as in the authors' release), so
    phi is positive and "spiky" (low entropy), and phi(q).phi(k) grows monotonically with q.k along
    W's directions. W is initialised to the identity (rectangular if ``num_features != head_dim``)
    and trained, e.g. by distilling softmax attention weights (LoLCATs, Hedgehog conversion).

    Args:
        head_dim: D.
        num_heads: if given, one W per head and inputs must be [..., num_heads, D]; else one W
            shared by all heads.
        num_features: columns of W (D' / 2); ``None`` = head_dim.
        bias: learn a bias b (initialised to zero).

    Example:
        >>> import torch
        >>> phi = HedgehogFeatureMap(16, num_heads=4)
        >>> phi(torch.randn(2, 5, 4, 16)).shape
        torch.Size([2, 5, 4, 32])
    """

    def __init__(self, head_dim: int, num_heads: int | None = None, num_features: int | None = None,
                 bias: bool = False):
        super().__init__(head_dim)
        num_features = head_dim if num_features is None else num_features
        _check_positive_int("HedgehogFeatureMap", "num_features", num_features)
        if num_heads is not None:
            _check_positive_int("HedgehogFeatureMap", "num_heads", num_heads)
        self.num_heads = num_heads
        self.num_features = num_features
        self.feature_dim = 2 * num_features
        eye = torch.eye(head_dim, num_features)
        lead = () if num_heads is None else (num_heads,)
        self.weight = nn.Parameter(eye.expand(*lead, head_dim, num_features).clone())
        self.bias = nn.Parameter(torch.zeros(*lead, num_features)) if bias else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        dtype = _compute_dtype(x)
        w = self.weight.to(dtype)
        if self.num_heads is None:
            z = x.to(dtype) @ w
        else:
            if x.dim() < 2 or x.shape[-2] != self.num_heads:
                raise ValueError(f"HedgehogFeatureMap: x must have shape [..., num_heads={self.num_heads}, "
                                 f"head_dim={self.head_dim}], got {list(x.shape)}")
            z = torch.einsum("...hd,hdf->...hf", x.to(dtype), w)
        if self.bias is not None:
            z = z + self.bias.to(dtype)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1).to(x.dtype)


class CosFormerFeatureMap(FeatureMap):
    """cosFormer's cos-reweighted map ("cosFormer: Rethinking Softmax in Attention", Qin et al., 2022).

    cosFormer scores tokens i, j by relu(q_i).relu(k_j) * cos(pi/2 * (i - j) / M); with
    cos(a - b) = cos a cos b + sin a sin b this factorises as phi(q_i).phi(k_j) with

        phi(x_i) = [a(x_i) cos(pi i / (2M)),  a(x_i) sin(pi i / (2M))]      D' = 2 * head_dim

    where a = relu (``activation``) and i is the token's position. The weight is non-negative for
    0 <= i, j <= M; M (``max_len``) must bound the positions (cosFormer uses the sequence length;
    for causal decoding fix it to the longest context). Positions are passed to ``forward``.

    Args:
        head_dim: D.
        max_len: M; may also be given per call.
        activation: ``"relu"`` (cosFormer) or ``None`` (no activation; then phi may be negative).

    Example:
        >>> import torch
        >>> phi = CosFormerFeatureMap(16, max_len=128)
        >>> x = torch.randn(2, 10, 4, 16)
        >>> phi(x, positions=torch.arange(10)).shape
        torch.Size([2, 10, 4, 32])
    """

    needs_positions = True

    def __init__(self, head_dim: int, max_len: int | None = None, activation: str | None = "relu"):
        super().__init__(head_dim)
        if max_len is not None:
            _check_positive_int("CosFormerFeatureMap", "max_len", max_len)
        if activation not in ("relu", None):
            raise ValueError(f"CosFormerFeatureMap: activation must be 'relu' or None, got {activation!r}")
        self.max_len = max_len
        self.activation = activation
        self.feature_dim = 2 * head_dim

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Apply phi.

        Args:
            x: [B, T, ..., D] (e.g. [B, T, H, D]).
            positions: [B, T] or [T] the positions i of the tokens, 0 <= i <= M.
            max_len: M for this call (overrides the constructor's).

        Returns:
            [B, T, ..., 2D].
        """
        self._check(x)
        M = self.max_len if max_len is None else max_len
        if M is None:
            raise ValueError("CosFormerFeatureMap: max_len (M) must be given to the constructor or to forward")
        _check_positive_int("CosFormerFeatureMap", "max_len", M)
        if x.dim() < 3:
            raise ValueError(f"CosFormerFeatureMap: x must have shape [B, T, ..., D], got {list(x.shape)}")
        B, T = x.shape[:2]
        if not isinstance(positions, torch.Tensor) or positions.dim() not in (1, 2) or positions.shape[-1] != T \
                or (positions.dim() == 2 and positions.shape[0] not in (1, B)):
            got = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ValueError(f"CosFormerFeatureMap: positions must have shape [B, T] = [{B}, {T}] or [T], got {got}")
        if values_checked(positions) and positions.numel() and \
                (bool((positions < 0).any()) or bool((positions > M).any())):
            raise ValueError(f"CosFormerFeatureMap: positions must lie in [0, max_len={M}], got values in "
                             f"[{positions.min().item()}, {positions.max().item()}]")
        pos = positions.reshape(-1, T, *([1] * (x.dim() - 2))).to(device=x.device, dtype=_compute_dtype(x))
        angle = pos * (math.pi / (2 * M))
        a = F.relu(x) if self.activation == "relu" else x
        return torch.cat([a * angle.cos().to(x.dtype), a * angle.sin().to(x.dtype)], dim=-1)


def _orthogonal_gaussian(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, dim] float64: blocks of orthonormal rows, each row rescaled to a chi(dim) norm."""
    num_blocks = -(-num_rows // dim)
    q, r = torch.linalg.qr(torch.randn(num_blocks, dim, dim, generator=generator, dtype=torch.float64))
    # sign-fix so each Q is Haar-distributed (LAPACK's R may have negative diagonal entries, which
    # would bias the directions and with them the kernel estimate)
    q = q * torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0)[..., None, :]
    rows = q.transpose(-1, -2).reshape(num_blocks * dim, dim)[:num_rows]
    norms = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Performer: Choromanski et al., "Rethinking
    Attention with Performers", 2021).

        x' = s x,   phi(x) = exp(W x' - |x'|^2 / 2 - c(x)) / sqrt(m)        D' = m

    W [m, d] holds orthogonal Gaussian rows (blocks of d orthonormal rows, each rescaled to the norm
    of an independent N(0, I_d) vector), drawn once from ``seed`` and kept as a buffer (saved with
    the state dict). Without the stabiliser (c = 0), E[phi(q).phi(k)] = exp(q'.k'), which is the
    softmax kernel exp(q.k / sqrt(d)) for the default s = d^(-1/4).

    Stabiliser (``stabilize=True``): c(x) = max_j (w_j.x') - |x'|^2/2, the largest exponent of
    *this token* (per token, per head), so the largest feature equals 1/sqrt(m) and exp never
    overflows. It multiplies phi(x_t) by the per-token constant exp(-c(x_t)): for queries this
    cancels in normalised linear attention; for keys it re-weights each key t by exp(-c(k_t)), a
    bias traded for robustness (Performer's release subtracts a max over all keys instead, which is
    not causal). Use ``stabilize=False`` for the unbiased estimator.

    Args:
        head_dim: d.
        num_features: m; ``None`` = round(d ln d) (the paper's choice), at least 1.
        seed: seed of the random projection (same seed -> same W).
        stabilize: subtract the per-token max described above.
        scale: s; ``None`` = d^(-1/4).

    Example:
        >>> import torch
        >>> phi = PerformerFeatureMap(16, num_features=64, seed=0)
        >>> y = phi(torch.randn(2, 5, 4, 16))
        >>> y.shape, bool((y > 0).all())
        (torch.Size([2, 5, 4, 64]), True)
    """

    def __init__(self, head_dim: int, num_features: int | None = None, seed: int = 0, stabilize: bool = True,
                 scale: float | None = None):
        super().__init__(head_dim)
        if num_features is None:
            num_features = max(1, round(head_dim * math.log(head_dim)))
        _check_positive_int("PerformerFeatureMap", "num_features", num_features)
        self.num_features = num_features
        self.feature_dim = num_features
        self.stabilize = stabilize
        self.scale = head_dim ** -0.25 if scale is None else float(scale)
        self.seed = seed
        self.register_buffer("projection", self._draw(seed))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, stabilize={self.stabilize}, scale={self.scale:.4g}"

    def _draw(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return _orthogonal_gaussian(self.num_features, self.head_dim, generator).float()

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Redraw the projection from a new seed (Performer redraws periodically in training)."""
        self.seed = seed
        self.projection.copy_(self._draw(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        dtype = _compute_dtype(x)
        xs = x.to(dtype) * self.scale
        z = xs @ self.projection.to(dtype).T - xs.pow(2).sum(-1, keepdim=True) / 2
        if self.stabilize:
            z = z - z.amax(-1, keepdim=True)
        return (z.exp() * self.num_features ** -0.5).to(x.dtype)


class CosineFeatureMap(FeatureMap):
    """phi(x) = x / max(||x||_2, eps): cosine-similarity attention (Cottention: "Linear Transformers
    With Cosine Attention", Mongaras et al., 2024), so phi(q).phi(k) = cos(q, k) in [-1, 1].

    Args:
        head_dim: D.
        eps: floor of the norm.

    Example:
        >>> import torch
        >>> y = CosineFeatureMap(16)(torch.randn(2, 5, 4, 16))
        >>> bool(torch.allclose(y.norm(dim=-1), torch.ones(2, 5, 4)))
        True
    """

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return F.normalize(x.to(_compute_dtype(x)), dim=-1, eps=self.eps).to(x.dtype)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C [n, n]: C[k, j] = s_k cos(pi (2j + 1) k / (2n)),
    s_0 = sqrt(1/n), s_k = sqrt(2/n); (C x) is the DCT-II of x and C C^T = I.

    Example:
        >>> import torch
        >>> C = dct_matrix(8)
        >>> bool(torch.allclose(C @ C.T, torch.eye(8, dtype=torch.float64)))
        True
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] *= math.sqrt(0.5)
    return c.to(dtype)


class DiJiangFeatureMap(FeatureMap):
    """Weighted DCT feature map (DiJiang: "Efficient Large Language Models through Compact
    Kernelization", Chen et al., 2024; its "frequency domain kernelization").

        phi(x) = softmax( t * (C x) + log w )  =  w * exp(t * (C x)) / sum_j w_j exp(t_j (C x)_j)

    with D' = d and
      * C [d, d] the orthonormal DCT-II matrix (:func:`dct_matrix`), a fixed buffer: the
        deterministic frequency-domain replacement of Performer's random projection;
      * t [d] the (weighted quasi-Monte Carlo) frequencies t_i = Phi^{-1}((pi(i) + 1/2) / d):
        a stratified, midpoint sample of N(0, 1) assigned to the DCT frequencies by a permutation pi
        drawn from ``seed``; a fixed buffer;
      * w = exp(log_weight) [d] the learnable positive weights D of the paper (initialised to 1).
    The per-token normalisation (softmax over the features) follows the authors' release; it is a
    positive per-token factor, which keeps exp from overflowing. phi is strictly positive.

    Args:
        head_dim: d.
        seed: seed of the frequency permutation.

    Example:
        >>> import torch
        >>> phi = DiJiangFeatureMap(16)
        >>> y = phi(torch.randn(2, 5, 4, 16))
        >>> y.shape, bool((y > 0).all())
        (torch.Size([2, 5, 4, 16]), True)
    """

    def __init__(self, head_dim: int, seed: int = 0):
        super().__init__(head_dim)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(head_dim, generator=generator).double()
        self.register_buffer("dct", dct_matrix(head_dim).float())
        self.register_buffer("frequencies", torch.special.ndtri((order + 0.5) / head_dim).float())
        self.log_weight = nn.Parameter(torch.zeros(head_dim))
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        dtype = _compute_dtype(x)
        z = (x.to(dtype) @ self.dct.to(dtype).T) * self.frequencies.to(dtype) + self.log_weight.to(dtype)
        return z.softmax(-1).to(x.dtype)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "identity": IdentityFeatureMap,
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "taylor": TaylorFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "cosformer": CosFormerFeatureMap,
    "performer": PerformerFeatureMap,
    "cosine": CosineFeatureMap,
    "dijiang": DiJiangFeatureMap,
}


def get_feature_map(name: str, head_dim: int, **kwargs) -> FeatureMap:
    """Build the feature map ``name`` (a key of ``FEATURE_MAPS``) for inputs of size ``head_dim``.

    Args:
        name: one of "identity", "elu", "relu", "taylor", "hedgehog", "cosformer", "performer",
            "cosine", "dijiang".
        head_dim: the size D of q and k's last axis.
        **kwargs: the map's own constructor arguments (e.g. ``num_features``, ``seed``).

    Example:
        >>> phi = get_feature_map("taylor", 16)
        >>> phi.feature_dim
        273
    """
    if name not in FEATURE_MAPS:
        raise ValueError(f"get_feature_map: unknown feature map {name!r}; valid names: {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](head_dim, **kwargs)
