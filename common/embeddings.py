"""Sinusoidal timestep embedding shared by Z-Image and FLUX."""

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) scalars -> (B, dim) fp32 features [cos(t*f_k), sin(t*f_k)] with f_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t[:, None].float() * freqs  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
