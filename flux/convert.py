"""FLUX.1 checkpoint layouts: Black Forest Labs' single file (ours) <-> diffusers' FluxTransformer2DModel.

Most tensors are only renamed (tables below, per module; `.weight`/`.bias` follow unchanged).
The special cases:

    ours (BFL)                                  diffusers
    double_blocks.N.img_attn.qkv                transformer_blocks.N.attn.to_q | to_k | to_v  (rows concatenated)
    double_blocks.N.txt_attn.qkv                transformer_blocks.N.attn.add_q_proj | add_k_proj | add_v_proj
    single_blocks.N.linear1                     single_transformer_blocks.N.attn.to_q | to_k | to_v | proj_mlp
    *.norm.query_norm.scale                     *.norm_q.weight (key_norm / norm_k likewise)
    final_layer.adaLN_modulation.1 (shift, scale)   norm_out.linear (scale, shift): halves swapped

ComfyUI files carry a `model.diffusion_model.` prefix, which is dropped on the way in.
"""

import re
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from zflux.common.weights import COMFY_PREFIX, CheckpointError, check_model, count_blocks, load_model, shape_of
from zflux.flux.model import MLP_RATIO, PRESETS, Flux, FluxConfig

FINAL_MOD = "final_layer.adaLN_modulation.1"

# Module renames, ours -> diffusers, in three scopes; a tuple is a fused module split into those parts.
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    FINAL_MOD: "norm_out.linear",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
SINGLE = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
# (ours, diffusers) key prefix before the block index, and the table for what follows it.
SCOPES = [("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE), ("", "", TOP)]
# Per scope: diffusers module -> (our module, number of parts it is one of).
INVERSE = [{d: (ours, len(parts)) for ours, parts in ((o, p if isinstance(p, tuple) else (p,)) for o, p in table.items())
            for d in parts} for _, _, table in SCOPES]


def _parse(key: str, side: int) -> tuple[int, str, str, str]:
    """key in our (side 0) or diffusers' (side 1) layout -> (scope index, block number, module path, parameter)."""
    module, _, param = key.rpartition(".")
    for scope, names in enumerate(SCOPES[:-1]):
        m = re.fullmatch(rf"{names[side]}\.(\d+)\.(.+)", module)
        if m:
            return scope, m.group(1), m.group(2), param
    return len(SCOPES) - 1, "", module, param


def _key(scope: int, side: int, number: str, module: str, param: str) -> str:
    return ".".join(p for p in (SCOPES[scope][side], number, module, param) if p)


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along the output dim."""
    first, second = t.chunk(2)
    return torch.cat([second, first])


def _is_norm(module: str) -> bool:
    return module.endswith("_norm")  # BFL's QK-norms (query_norm, key_norm) name their weight `scale`


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers (or ComfyUI-prefixed, or already BFL) keys -> the BFL layout; unknown keys pass through."""
    out, fused = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix(COMFY_PREFIX)
        scope, number, module, param = _parse(key, side=1)
        if module not in INVERSE[scope]:
            out[key] = value
            continue
        ours, n_parts = INVERSE[scope][module]
        ours_key = _key(scope, 0, number, ours, "scale" if _is_norm(ours) else param)
        if n_parts > 1:
            fused.setdefault(ours_key, {})[key] = value  # by its diffusers key
        else:
            out[ours_key] = _swap_halves(value) if ours == FINAL_MOD else value
    for ours_key, parts in fused.items():
        scope, number, module, param = _parse(ours_key, side=0)
        names = [_key(scope, 1, number, name, param) for name in SCOPES[scope][2][module]]  # the parts, in order
        missing = [name for name in names if name not in parts]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {', '.join(missing)}: {ours_key} fuses {', '.join(names)}")
        out[ours_key] = torch.cat([parts[name] for name in names])  # rows of q, k, v (, mlp) in order
    return out


def to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL (or ComfyUI-prefixed) layout -> diffusers' FluxTransformer2DModel keys."""
    out = {}
    for key, value in from_diffusers(state_dict).items():
        scope, number, module, param = _parse(key, side=0)
        table = SCOPES[scope][2]
        if module not in table:
            out[key] = value
            continue
        target, param = table[module], "weight" if _is_norm(module) else param
        if isinstance(target, tuple):
            out.update({_key(scope, 1, number, name, param): part.clone()  # clone: no shared storage
                        for name, part in zip(target, _split_fused(value, len(target)))})
        else:
            out[_key(scope, 1, number, target, param)] = _swap_halves(value) if module == FINAL_MOD else value
    return out


def _split_fused(t: Tensor, n_parts: int) -> list[Tensor]:
    """qkv rows in thirds; linear1 rows as q, k, v (dim each) and the MLP (MLP_RATIO * dim)."""
    if n_parts == 3:
        return list(t.chunk(3))
    dim = round(t.shape[0] / (3 + MLP_RATIO))
    return list(t.split([dim, dim, dim, t.shape[0] - 3 * dim]))


def config_from_state_dict(state_dict: dict[str, Tensor]) -> FluxConfig:
    """The FluxConfig a BFL-layout checkpoint was made for, read off its key names and shapes."""
    shape, count = partial(shape_of, state_dict, model="FLUX"), partial(count_blocks, state_dict)
    dim, in_channels = shape("img_in.weight")
    head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
    if head_dim != sum(PRESETS["flux-dev"].axes_dims_rope):
        raise CheckpointError(f"head dim {head_dim} is not FLUX.1's {sum(PRESETS['flux-dev'].axes_dims_rope)}: pass cfg explicitly")
    return FluxConfig(in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
                      num_layers=count("double_blocks"), num_single_layers=count("single_blocks"),
                      attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
                      joint_attention_dim=shape("txt_in.weight")[1], pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
                      guidance_embeds="guidance_in.in_layer.weight" in state_dict)


# How to build the model a checkpoint holds (common.weights.load_model / check_model).
CHECKPOINTS = dict(build=Flux, convert=from_diffusers, to_diffusers=to_diffusers, parse_config=FluxConfig.from_diffusers,
                   infer_config=config_from_state_dict)


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     cfg: FluxConfig | None = None) -> Flux:
    """Load a FLUX.1 transformer from a BFL single file (plain or ComfyUI-prefixed), a diffusers `transformer/` folder, or shards.

    Without `cfg`, the config comes from the folder's config.json, else from the checkpoint's keys
    (dev vs schnell from the guidance embedder, tools from the input channels).
    """
    return load_model(path, **CHECKPOINTS, cfg=cfg, device=device, dtype=dtype)


def check_transformer(path: str | Path, cfg: FluxConfig | None = None) -> FluxConfig:
    """What load_transformer checks before it reads a tensor (config, keys, shapes, from the header); the config it would use."""
    return check_model(path, **CHECKPOINTS, cfg=cfg)
