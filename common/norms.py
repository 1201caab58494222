"""RMSNorm, LayerNorm and the modulated forms the model families use: the plain PyTorch definitions.

Each function is the single definition of its math; the fused kernels in `zflux.kernels` are tested
against it, and `ops.py` chooses between the two at run time. Statistics are accumulated in fp32.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class ModulationOut(NamedTuple):
    """adaLN parameters for one branch, each (B, 1, C): (1 + scale) * norm(x) + shift in, x + gate * out after (FLUX.1, FLUX.2)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def layer_norm_modulate(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift (adaLN, LayerNorm without affine parameters); x (B, S, C), shift/scale (B, 1, C)."""
    out = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale)
    return out if shift is None else out + shift


def rms_norm_scale(x: Tensor, weight: Tensor, scale: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) * (1 + scale): Z-Image's modulated pre-norm; scale (B, 1, C), or (B, S, C) per token (Omni)."""
    return rms_norm(x, weight, eps) * (1 + scale)


def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """x + gate * RMSNorm(y): Z-Image's sandwich-norm residual; gate (B, 1, C) or (B, S, C), already tanh'd."""
    return x + gate * rms_norm(y, weight, eps)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + gate * y in one pass, rounded once: FLUX's gated residual; gate (B, 1, C)."""
    return torch.addcmul(x, gate, y)


def gated_rms_residual_norm_scale(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor,
                                  eps: float) -> tuple[Tensor, Tensor]:
    """(x + gate * RMSNorm(y), RMSNorm of that * (1 + scale)): Z-Image's attention residual and its MLP's pre-norm."""
    x = gated_rms_residual(x, y, weight, gate, eps)
    return x, rms_norm_scale(x, norm_weight, scale, eps)


def gated_residual_layer_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                       eps: float) -> tuple[Tensor, Tensor]:
    """(x + gate * y, (1 + scale) * LayerNorm of that + shift): FLUX's attention residual and its MLP's adaLN."""
    x = gated_residual(x, y, gate)
    return x, layer_norm_modulate(x, shift, scale, eps)


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, x_bias: Tensor | None = None,
                    silu: bool = True) -> Tensor:
    """SiLU(GroupNorm(x + x_bias)): the autoencoders' pre-activation; x (B, C, H, W), weight, bias and x_bias (C,).

    `x_bias` is the bias of the convolution that made x, when the caller ran it without one to fold it in here.
    Without `silu`, the plain GroupNorm (the attention block's)."""
    if x_bias is not None:
        x = x + x_bias[:, None, None]
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y, inplace=True) if silu else y


def bias_residual(h: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """h + bias + x, in place in h: a ResNet block's output from its last convolution run without its bias (C,)."""
    return h.add_(bias[:, None, None]).add_(x)
