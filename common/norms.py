"""RMSNorm, LayerNorm and the modulated forms the two model families use.

Each function is the single definition of its math; with the `triton` backend on a CUDA tensor it
runs the fused kernel from `kernels/` instead. Statistics are always accumulated in fp32.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zflux.common.backend import use_kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim."""
    if use_kernels(x):
        from zflux.kernels.rmsnorm import rms_norm as fused

        return fused(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine parameters over the last dim."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def layer_norm_modulate(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift (adaLN); x (B, S, C), shift/scale (B, 1, C)."""
    if use_kernels(x):
        from zflux.kernels.modulate import layer_norm_modulate as fused

        return fused(x, shift, scale, eps)
    out = layer_norm(x, eps) * (1 + scale)
    return out if shift is None else out + shift


def rms_norm_scale(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) * (1 + scale): Z-Image's modulated pre-norm; scale (B, 1, C)."""
    if use_kernels(x):
        from zflux.kernels.modulate import rms_norm_scale as fused

        return fused(x, weight, scale, eps)
    return rms_norm(x, weight, eps) * (1 + scale)


def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x + gate * RMSNorm(y): Z-Image's sandwich-norm residual; gate (B, 1, C), already tanh'd."""
    if use_kernels(x):
        from zflux.kernels.modulate import gated_rms_residual as fused

        return fused(x, y, weight, gate, eps)
    return x + gate * rms_norm(y, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
