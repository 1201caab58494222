"""Real-valued N-axis rotary position embedding (RoPE), shared by Z-Image and FLUX.

Each token carries one integer position per axis (`ids`, shape (..., S, n_axes)). Axis i owns
`axes_dims[i]` channels of every head; within them, adjacent channel pairs (x[2k], x[2k+1]) are
rotated by the angle pos_i * theta^(-2k / axes_dims[i]). The tables are kept as cos and sin of
shape (..., S, D/2), so no complex tensors are needed anywhere.
"""

import torch
from torch import Tensor

from zflux.common.norms import rms_norm


def check_axes_dims(axes_dims: tuple[int, ...], head_dim: int) -> None:
    """Raise ValueError unless every axis has an even number of channels and together they fill the head dim."""
    if sum(axes_dims) != head_dim or any(d % 2 for d in axes_dims):
        raise ValueError(f"axes_dims_rope {axes_dims} must be even and sum to the head dim {head_dim}")


def rope_tables(ids: Tensor, axes_dims: tuple[int, ...], theta: float, fp32_angles: bool = False) -> tuple[Tensor, Tensor]:
    """cos, sin tables (..., S, sum(axes_dims)/2) in fp32 for integer positions `ids` (..., S, n_axes)."""
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids have {ids.shape[-1]} position axes, RoPE expects {len(axes_dims)}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)  # (dim/2,)
        angles.append(ids[..., axis, None].to(torch.float64) * omega)  # (..., S, dim/2)
    angle = torch.cat(angles, dim=-1)  # (..., S, D/2)
    # Z-Image's reference rounds the angles to fp32 before taking cos/sin; FLUX's takes them in fp64.
    if fp32_angles:
        angle = angle.float()
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, H, S, D) by tables (B, S, D/2); math in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, S, D/2, 2)
    # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) as pairs * cos + swapped pairs * (-sin, sin):
    # two fused elementwise passes in eager mode.
    signed_sin = torch.stack([-sin, sin], dim=-1)[:, None]  # (B, 1, S, D/2, 2)
    out = torch.addcmul(pairs * cos[:, None, ..., None], pairs.flip(-1), signed_sin)  # (B, H, S, D/2, 2)
    return out.flatten(-2).type_as(x)  # (B, H, S, D)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RMSNorm over the head dim of q and k (B, H, S, D), then RoPE: the step both models share."""
    return apply_rope(rms_norm(q, q_weight, eps), cos, sin), apply_rope(rms_norm(k, k_weight, eps), cos, sin)
