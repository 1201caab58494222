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

The ControlNet Union files are published with diffusers' names (a diffusers folder holds the same
keys); ours fuse their attention projections the same way and call `control_all_x_embedder.2-1`
`control_x_embedder`, like the transformer's `x_embedder`.
"""

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from zflux.common.identify import check_family, read_header
from zflux.common.weights import COMFY_PREFIX, CheckpointError, check_model, load_model, read_config
from zflux.zimg.controlnet import ControlNetConfig, ZImageControlNet
from zflux.zimg.model import PRESETS, ZImageConfig, ZImageTransformer
from zflux.zimg.omni import ZImageOmniTransformer

PATCH_KEY = "2-1"  # diffusers' key for spatial patch 2, frame patch 1
RENAMES = [  # (official, diffusers) substrings
    ("x_embedder.", f"all_x_embedder.{PATCH_KEY}."),
    ("final_layer.", f"all_final_layer.{PATCH_KEY}."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
]
QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")
CONTROL_EMBEDDER = [("control_x_embedder.", f"control_all_x_embedder.{PATCH_KEY}.")]  # (ours, published)
UNUSED_IN_2_0 = "control_noise_refiner."  # 2.0's file carries zeroed refiner blocks it never runs
# The base transformer's modules a ControlNet uses: a diffusers pipeline attaches them to it (from_transformer), so its
# controlnet/ folder saves copies of them, which the base's own weights make redundant.
SHARED_WITH_BASE = ("t_embedder.", "all_x_embedder.", "cap_embedder.", "noise_refiner.", "context_refiner.", "x_pad_token",
                    "cap_pad_token")


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


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     cfg: ZImageConfig | None = None) -> ZImageTransformer:
    """Load a Z-Image transformer (Turbo or base) from an official single file, a diffusers `transformer/` folder, or shards."""
    return load_model(path, **_checkpoint(path, omni=False, cfg=cfg), device=device, dtype=dtype)


def load_omni_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                          cfg: ZImageConfig | None = None) -> ZImageOmniTransformer:
    """Load a Z-Image Omni transformer (zimg/omni.py) from a single file, a diffusers `transformer/` folder, or shards."""
    return load_model(path, **_checkpoint(path, omni=True, cfg=cfg), device=device, dtype=dtype)


def check_transformer(path: str | Path, omni: bool = False, cfg: ZImageConfig | None = None) -> ZImageConfig:
    """What load_transformer (omni: load_omni_transformer) checks before it reads a tensor (config, keys and shapes, from
    the header); the config it would use."""
    return check_model(path, **_checkpoint(path, omni=omni, cfg=cfg))


def _checkpoint(path: str | Path, omni: bool, cfg: ZImageConfig | None) -> dict:
    """load_model's arguments for the plain or the Omni transformer at `path`; a checkpoint or config of the other kind is
    refused here, before any weight is read."""
    use = "load_omni_transformer (ZImageOmniPipeline)" if not omni else "load_transformer (ZImagePipeline)"

    def parse(config: dict) -> ZImageConfig:
        parsed = ZImageConfig.from_diffusers(config)
        if parsed.is_omni != omni:
            raise ValueError(f"{'a' if parsed.is_omni else 'not a'} Z-Image Omni config (siglip_feat_dim "
                             f"{'set' if parsed.is_omni else 'unset'}): load it with {use}")
        return parsed

    cfg = cfg or read_config(path, parse)
    info = check_family(path, "z-image")
    if (info.variant == "z-image-omni") != omni:
        raise CheckpointError(f"{path} holds {info.description}: load it with {use}")
    if cfg is None and omni:  # a single file: the full-size shape, with the SigLIP width its embedder has
        width = next(shape[1] for key, (_, shape) in read_header(path).items() if key.endswith("siglip_embedder.1.weight"))
        cfg = replace(PRESETS["z-image-turbo"], siglip_feat_dim=width)
    # Turbo and base share every shape: a file without config.json is the full-size model.
    return dict(build=ZImageOmniTransformer if omni else ZImageTransformer, convert=from_diffusers, to_diffusers=to_diffusers,
                parse_config=parse, infer_config=lambda _: PRESETS["z-image-turbo"], cfg=cfg)


def controlnet_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A published ControlNet Union file or diffusers folder (the same keys), or ours -> our layout."""
    return {_rename(key, [(new, old) for old, new in CONTROL_EMBEDDER]): value for key, value in from_diffusers(state_dict).items()}


def controlnet_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ControlNet layout -> the published files' (and diffusers' ZImageControlNetModel's) keys."""
    return {_rename(key, CONTROL_EMBEDDER): value for key, value in to_diffusers(state_dict).items()}


def load_controlnet(path: str | Path, base: ZImageConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                    cfg: ControlNetConfig | None = None) -> ZImageControlNet:
    """Load a ControlNet Union file (any of the three published variants) or diffusers folder for the transformer `base`.

    The variant comes from the keys (as diffusers tells them apart), the config from config.json when
    there is one, else from the variant and the tensor shapes; a ControlNet that does not fit `base`
    is refused before any weight is read.
    """
    info = check_family(path, "z-image-controlnet")
    cfg = cfg or read_config(path, ControlNetConfig.from_diffusers)
    if cfg is None and info.variant is None:
        raise CheckpointError(f"{path} holds {info.description}: a config.json beside it must say where its hints go")
    cfg = cfg or ControlNetConfig.from_shapes({k: shape for k, (_, shape) in read_header(path).items()}, info.variant)
    try:
        cfg.check_fits(base)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e

    unused = SHARED_WITH_BASE + ((UNUSED_IN_2_0,) if info.variant == "z-image-turbo-controlnet-2.0" else ())

    def convert(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return controlnet_from_diffusers({k: v for k, v in state_dict.items() if not k.startswith(unused)})

    return load_model(path, ZImageControlNet, convert, parse_config=ControlNetConfig.from_diffusers, infer_config=lambda _: cfg,
                      to_diffusers=controlnet_to_diffusers, cfg=cfg, device=device, dtype=dtype)
