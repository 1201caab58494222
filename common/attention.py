"""Attention dispatch: every model calls `attention`, which picks the backend at run time."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from zflux.common.backend import current_backend, use_flash_kernel


def key_padding_mask(key_lens: Tensor, seq_len: int) -> Tensor:
    """(B,) valid lengths -> (B, 1, 1, S) bool mask, True where a key may be attended to."""
    return (torch.arange(seq_len, device=key_lens.device) < key_lens[:, None])[:, None, None, :]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32 on (B, H, S, D) inputs; keys at index >= key_lens are ignored."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5  # (B, H, S, S)
    if key_lens is not None:
        scores = scores.masked_fill(~key_padding_mask(key_lens, k.shape[2]), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).type_as(q)  # (B, H, S, D)


def attention(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """Non-causal attention on (B, H, S, D) q, k, v -> (B, S, H*D).

    `key_lens` (B,) marks right padding: keys at index >= key_lens[b] are masked out. Pass None
    when every sequence is full, which lets SDPA use its fastest (mask-free) kernels.
    """
    if use_flash_kernel(q, masked=key_lens is not None):
        from zflux.kernels.attention import flash_attention

        out = flash_attention(q, k, v, key_lens)
    elif current_backend() == "reference":
        out = reference_attention(q, k, v, key_lens)
    else:
        mask = None if key_lens is None else key_padding_mask(key_lens, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, D)
    return rearrange(out, "b h s d -> b s (h d)")
