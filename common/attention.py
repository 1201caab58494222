"""Attention's plain PyTorch pieces: the fp32 reference and key-padding masks.

Models call `ops.attention`, which picks SDPA, this reference or the Triton flash kernel at run time.
"""

import torch
from torch import Tensor


def key_padding_mask(key_lens: Tensor, seq_len: int) -> Tensor:
    """(B,) valid lengths -> (B, 1, 1, S) bool mask, True where a key may be attended to."""
    return (torch.arange(seq_len, device=key_lens.device) < key_lens[:, None])[:, None, None, :]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32 on (B, H, S, D) inputs; keys at index >= key_lens are ignored."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5  # (B, H, S, S)
    if key_lens is not None:
        scores = scores.masked_fill(~key_padding_mask(key_lens, k.shape[2]), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).type_as(q)  # (B, H, S, D)
