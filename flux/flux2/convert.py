"""FLUX.2 checkpoint layouts: Black Forest Labs' single file (ours) <-> diffusers' Flux2Transformer2DModel.

Every tensor is a `.weight` (FLUX.2 has no biases); most are only renamed (`RENAMES`, one module
path per line, `{n}` standing for a block number). The special cases:

    ours (BFL)                                   diffusers
    double_blocks.{n}.img_attn.qkv               transformer_blocks.{n}.attn.to_q | to_k | to_v  (rows concatenated)
    double_blocks.{n}.txt_attn.qkv               transformer_blocks.{n}.attn.add_q_proj | add_k_proj | add_v_proj
    *_norm.scale (QK-norm weights)               *.weight
    final_layer.adaLN_modulation.1 (shift, scale)    norm_out.linear (scale, shift): halves swapped

The single blocks' `linear1` (q | k | v | SwiGLU input) stays fused in both layouts, and the shared
modulation Linears keep their (shift, scale, gate) order. ComfyUI files carry a
`model.diffusion_model.` prefix, which is dropped on the way in.
"""

import re
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from zflux.common.weights import COMFY_PREFIX, CheckpointError, count_blocks, load_model, shape_of
from zflux.flux.flux2.model import Flux2, Flux2Config

FINAL_MOD = "final_layer.adaLN_modulation.1"
RENAMES = {  # our module path -> diffusers'
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "double_blocks.{n}.img_attn.norm.query_norm": "transformer_blocks.{n}.attn.norm_q",
    "double_blocks.{n}.img_attn.norm.key_norm": "transformer_blocks.{n}.attn.norm_k",
    "double_blocks.{n}.txt_attn.norm.query_norm": "transformer_blocks.{n}.attn.norm_added_q",
    "double_blocks.{n}.txt_attn.norm.key_norm": "transformer_blocks.{n}.attn.norm_added_k",
    "double_blocks.{n}.img_attn.proj": "transformer_blocks.{n}.attn.to_out.0",
    "double_blocks.{n}.txt_attn.proj": "transformer_blocks.{n}.attn.to_add_out",
    "double_blocks.{n}.img_mlp.0": "transformer_blocks.{n}.ff.linear_in",
    "double_blocks.{n}.img_mlp.2": "transformer_blocks.{n}.ff.linear_out",
    "double_blocks.{n}.txt_mlp.0": "transformer_blocks.{n}.ff_context.linear_in",
    "double_blocks.{n}.txt_mlp.2": "transformer_blocks.{n}.ff_context.linear_out",
    "single_blocks.{n}.linear1": "single_transformer_blocks.{n}.attn.to_qkv_mlp_proj",
    "single_blocks.{n}.linear2": "single_transformer_blocks.{n}.attn.to_out",
    "single_blocks.{n}.norm.query_norm": "single_transformer_blocks.{n}.attn.norm_q",
    "single_blocks.{n}.norm.key_norm": "single_transformer_blocks.{n}.attn.norm_k",
    "final_layer.linear": "proj_out",
    FINAL_MOD: "norm_out.linear",
}
FUSED = {  # our fused module -> diffusers' parts, in row order
    "double_blocks.{n}.img_attn.qkv": ("transformer_blocks.{n}.attn.to_q", "transformer_blocks.{n}.attn.to_k",
                                       "transformer_blocks.{n}.attn.to_v"),
    "double_blocks.{n}.txt_attn.qkv": ("transformer_blocks.{n}.attn.add_q_proj", "transformer_blocks.{n}.attn.add_k_proj",
                                       "transformer_blocks.{n}.attn.add_v_proj"),
}
# diffusers module -> (our module, our parameter name); a fused part -> (our module, part index, number of parts)
INVERSE = {theirs: ours for ours, theirs in RENAMES.items()}
PART_OF = {part: (ours, i, len(parts)) for ours, parts in FUSED.items() for i, part in enumerate(parts)}
BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _template(key: str) -> tuple[str, str, str]:
    """'double_blocks.3.img_attn.qkv.weight' -> ('double_blocks.{n}.img_attn.qkv', '3', 'weight')."""
    module, _, param = key.rpartition(".")
    m = BLOCK.match(module + ".")
    if m is None:
        return module, "", param
    return f"{m.group(1)}.{{n}}.{module[m.end():]}".rstrip("."), m.group(2), param


def _is_norm(module: str) -> bool:
    return module.endswith("_norm")  # BFL's QK-norms (query_norm, key_norm) name their weight `scale`


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along the output dim."""
    first, second = t.chunk(2)
    return torch.cat([second, first])


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers (or ComfyUI-prefixed, or already BFL) keys -> the BFL layout; unknown keys pass through."""
    out, fused = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix(COMFY_PREFIX)
        module, n, param = _template(key)
        if module in PART_OF:
            ours, index, n_parts = PART_OF[module]
            fused.setdefault(ours.format(n=n) + "." + param, [None] * n_parts)[index] = value
        elif module in INVERSE:
            ours = INVERSE[module]
            out[ours.format(n=n) + "." + ("scale" if _is_norm(ours) else param)] = _swap_halves(value) if ours == FINAL_MOD else value
        else:
            out[key] = value
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"{key}: the diffusers checkpoint holds only {sum(p is not None for p in parts)} of its {len(parts)} parts")
        out[key] = torch.cat(parts)  # rows of q, k, v in order
    return out


def to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL (or ComfyUI-prefixed) layout -> diffusers' Flux2Transformer2DModel keys."""
    out = {}
    for key, value in from_diffusers(state_dict).items():
        module, n, param = _template(key)
        if module in FUSED:
            parts = FUSED[module]
            out.update({f"{name.format(n=n)}.{param}": part.clone()  # clone: no shared storage
                        for name, part in zip(parts, value.chunk(len(parts)))})
        elif module in RENAMES:
            theirs = RENAMES[module].format(n=n) + "." + ("weight" if _is_norm(module) else param)
            out[theirs] = _swap_halves(value) if module == FINAL_MOD else value
        else:
            out[key] = value
    return out


def config_from_state_dict(state_dict: dict[str, Tensor]) -> Flux2Config:
    """The Flux2Config a BFL-layout checkpoint was made for, read off its key names and shapes."""
    shape, count = partial(shape_of, state_dict, model="FLUX.2"), partial(count_blocks, state_dict)
    dim, in_channels = shape("img_in.weight")
    head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
    n_axes = len(Flux2Config().axes_dims_rope)
    if head_dim % (2 * n_axes):
        raise CheckpointError(f"head dim {head_dim} cannot be split over {n_axes} RoPE axes: pass cfg explicitly")
    return Flux2Config(in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
                       num_layers=count("double_blocks"), num_single_layers=count("single_blocks"),
                       attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
                       joint_attention_dim=shape("txt_in.weight")[1], mlp_ratio=(shape("single_blocks.0.linear2.weight")[1] - dim) / dim,
                       axes_dims_rope=(head_dim // n_axes,) * n_axes, guidance_embeds="guidance_in.in_layer.weight" in state_dict)


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     cfg: Flux2Config | None = None) -> Flux2:
    """Load a FLUX.2 transformer from a BFL single file (plain or ComfyUI-prefixed), a diffusers `transformer/` folder, or shards.

    Without `cfg`, the config comes from the folder's config.json, else from the checkpoint's keys
    and shapes ([dev] vs klein from the guidance embedder and the widths).
    """
    return load_model(path, Flux2, from_diffusers, parse_config=Flux2Config.from_diffusers, infer_config=config_from_state_dict,
                      to_diffusers=to_diffusers, cfg=cfg, device=device, dtype=dtype)
