"""FLUX.1's part of LoRA loading (common/lora.py does the rest): XLabs' module names, and the wider input projection
BFL's Canny / Depth LoRAs bring.

XLabs files name attention processors: a block's `qkv_lora1` / `proj_lora1` change the image stream's
fused qkv and output projection, `qkv_lora2` / `proj_lora2` the text stream's; a single block's
`qkv_lora` changes q, k and v (not the MLP input) of its `linear1`, `proj_lora` its `linear2`.
"""

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from zflux.flux.model import Flux

XLABS = {
    r"double_blocks\.(\d+)\.processor\.qkv_lora1": ("double_blocks.{0}.img_attn.qkv",),
    r"double_blocks\.(\d+)\.processor\.qkv_lora2": ("double_blocks.{0}.txt_attn.qkv",),
    r"double_blocks\.(\d+)\.processor\.proj_lora1": ("double_blocks.{0}.img_attn.proj",),
    r"double_blocks\.(\d+)\.processor\.proj_lora2": ("double_blocks.{0}.txt_attn.proj",),
    r"single_blocks\.(\d+)\.processor\.qkv_lora": ("single_transformer_blocks.{0}.attn.to_q", "single_transformer_blocks.{0}.attn.to_k",
                                                   "single_transformer_blocks.{0}.attn.to_v"),
    r"single_blocks\.(\d+)\.processor\.proj_lora": ("single_blocks.{0}.linear2",),
}
CONTROL_INPUT = "img_in"  # the one Linear a BFL control LoRA widens


def widen_input(model: Flux, width: int) -> Callable[[], None]:
    """Give img_in `width` inputs (noise and control tokens, as FLUX.1 Canny / Depth take them): the new inputs' weights
    zero and the bias kept, as diffusers expands it. Returns the undo."""
    old, cfg = model.img_in, model.cfg
    wider = nn.Linear(width, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, :old.in_features] = old.weight
        wider.bias.copy_(old.bias)
    model.img_in, model.cfg = wider, replace(cfg, in_channels=width)

    def undo() -> None:
        model.img_in, model.cfg = old, cfg

    return undo
