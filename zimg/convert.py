"""Z-Image checkpoint layouts: the official single file (ours) <-> diffusers' ZImageTransformer2DModel.

The layouts differ only in a few names and in the fused QKV projection:

    official (ours)                     diffusers
    x_embedder.*                        all_x_embedder.2-1.*
    final_layer.*                       all_final_layer.2-1.*
    *.attention.qkv.weight              *.attention.to_q/to_k/to_v.weight (split in thirds, q k v)
    *.attention.out.weight              *.attention.to_out.0.weight
    *.attention.q_norm.weight           *.attention.norm_q.weight (k likewise)

ComfyUI files carry a `model.diffusion_model.` prefix, and some official files an unused
`norm_final.weight`; both are dropped on the way in.
"""

from pathlib import Path

import torch
from torch import Tensor

from zflux.common.weights import COMFY_PREFIX, CheckpointError, check_model, load_model
from zflux.zimg.model import PRESETS, ZImageConfig, ZImageTransformer

PATCH_KEY = "2-1"  # diffusers' key for spatial patch 2, frame patch 1
RENAMES = [  # (official, diffusers) substrings
    ("x_embedder.", f"all_x_embedder.{PATCH_KEY}."),
    ("final_layer.", f"all_final_layer.{PATCH_KEY}."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
]
QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old) or (old.startswith(".") and old in key):
            return key.replace(old, new, 1)
    return key


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers (or ComfyUI-prefixed, or already official) keys -> the official layout."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix(COMFY_PREFIX)
        if key == "norm_final.weight":
            continue
        out[_rename(key, [(new, old) for old, new in RENAMES])] = value
    stems = {k.removesuffix(suffix) for k in out for suffix in QKV if k.endswith(suffix)}
    for stem in sorted(stems):
        missing = [stem + suffix for suffix in QKV if stem + suffix not in out]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {', '.join(missing)}: {stem}.attention.qkv.weight fuses "
                                  f"{', '.join(stem + suffix for suffix in QKV)}")
        out[stem + ".attention.qkv.weight"] = torch.cat([out.pop(stem + suffix) for suffix in QKV])  # (3*dim, dim)
    return out


def to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official layout -> diffusers' ZImageTransformer2DModel keys."""
    out = {}
    for key, value in from_diffusers(state_dict).items():
        if key.endswith(".attention.qkv.weight"):
            stem = key.removesuffix(".attention.qkv.weight")
            out.update({stem + suffix: w.clone() for suffix, w in zip(QKV, value.chunk(3))})  # clone: no shared storage
        else:
            out[_rename(key, RENAMES)] = value
    return out


# How to build the model a checkpoint holds (common.weights.load_model / check_model). Turbo and base share
# every shape: a file without config.json is the full-size model.
CHECKPOINTS = dict(build=ZImageTransformer, convert=from_diffusers, to_diffusers=to_diffusers,
                   parse_config=ZImageConfig.from_diffusers, infer_config=lambda _: PRESETS["z-image-turbo"])


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     cfg: ZImageConfig | None = None) -> ZImageTransformer:
    """Load a Z-Image transformer from an official single file, a diffusers `transformer/` folder, or shards."""
    return load_model(path, **CHECKPOINTS, cfg=cfg, device=device, dtype=dtype)


def check_transformer(path: str | Path, cfg: ZImageConfig | None = None) -> ZImageConfig:
    """What load_transformer checks before it reads a tensor (config, keys, shapes, from the header); the config it would use."""
    return check_model(path, **CHECKPOINTS, cfg=cfg)
