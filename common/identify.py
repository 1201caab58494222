"""What a checkpoint holds, read off its tensor names and shapes alone.

Only the safetensors header is read (names, dtypes, shapes), so naming a 24 GB file takes
milliseconds; the one exception is a Z-Image ControlNet 2.x, where one tensor tells 2.0 from 2.1.
The pipelines use this to refuse weights of the wrong family before loading
them, and `zflux info` to describe a file. What the keys tell apart:

- Z-Image (`cap_embedder`, `x_pad_token`; Omni adds `siglip_*`) and its ControlNet Union (v1
  `control_all_x_embedder`, 2.x 15 `control_layers`; 2.0 ships its unused `control_noise_refiner`
  zeroed or not at all, as diffusers' single_file_utils tells them apart) from FLUX.1 (`double_blocks.N.img_mod`, or diffusers'
  `single_transformer_blocks.N.proj_mlp`) from FLUX.2 (shared `single_stream_modulation`);
- FLUX.1 dev (a `guidance_in` embedder) from schnell (none); the tools by the input width of
  `img_in` (64 text-to-image, 384 Fill, 128 Canny or Depth). Kontext has dev's shapes exactly and
  Canny Depth's: only a name tells those apart, a word in the file name (`flux1-kontext-dev.safetensors`)
  or the pipeline class in the model_index.json of the snapshot a `transformer/` folder sits in;
- the layout: official single file, ComfyUI (official plus a `model.diffusion_model.` prefix) or diffusers;
- FLUX.2 [dev] (width 6144, a guidance embedder) from [klein] 4B (3072) and 9B (4096);
- the 16-channel autoencoder (`decoder.conv_in` input width) from FLUX.2's 32-channel one (with
  batch-norm statistics `bn.*`), the text encoders and SigLIP2 (a linear patch embedding).

Z-Image-Turbo and Z-Image base share every shape: only a snapshot's scheduler config tells them apart;
so do FLUX.2 [klein] distilled, base and KV, which only a snapshot's model_index.json names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors import safe_open

from zflux.common.files import COMFY_PREFIX, CheckpointError, safetensors_files

if TYPE_CHECKING:  # no torch import for a header: `zflux info` stays fast (safetensors imports it for read_tensor)
    from torch import Tensor

FAMILY_NAMES = {
    "z-image": "Z-Image", "z-image-controlnet": "a Z-Image ControlNet", "flux.1": "FLUX.1", "flux.2": "FLUX.2",
    "autoencoder": "an autoencoder", "t5": "a T5 text encoder", "clip": "a CLIP text encoder", "qwen3": "a Qwen3 text encoder",
    "siglip2": "a SigLIP2 vision encoder", "mistral3": "a Mistral 3 text encoder", "unknown": "unrecognised",
}
DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
CONTROLNETS = {  # diffusers' model type -> what it is
    "z-image-turbo-controlnet": "Z-Image-Turbo Fun ControlNet Union v1 (6 control blocks hinting layers 0, 5, ..., 25)",
    "z-image-turbo-controlnet-2.0": "Z-Image-Turbo Fun ControlNet Union 2.0 (15 control blocks hinting layers 0, 2, ..., 28 "
                                    "and the noise refiner)",
    "z-image-turbo-controlnet-2.1": "Z-Image-Turbo Fun ControlNet Union 2.1 (15 control blocks hinting layers 0, 2, ..., 28, "
                                    "2 more hinting the noise refiner)",
}
FLUX_TOOLS = {64: None, 384: "flux-fill", 128: "flux-canny-or-depth"}  # img_in input width -> variant (None: dev or schnell)
NAME_WORDS = {"kontext": "flux-kontext", "canny": "flux-canny", "depth": "flux-depth"}  # a word in a file name -> its variant
SNAPSHOT_CLASSES = {"FluxKontextPipeline": "flux-kontext"}  # a snapshot's pipeline class that names a variant the shapes cannot
FLUX2_MODES = {  # flux2_mode() -> what the snapshot's model_index.json says
    "distilled": "step-distilled: 4 steps, no CFG (model_index.json)",
    "base": "the base model: 50 steps with CFG (model_index.json)",
    "kv": "the KV-cache variant: reference K/V computed once (model_index.json)",
}
FLUX2_WIDTHS = {  # (hidden width, has a guidance embedder) -> FLUX.2 variant and what to say
    (6144, True): ("flux2-dev", "FLUX.2 [dev] (32B, guidance-distilled; Mistral Small 3 text features)"),
    (3072, False): ("flux2-klein-4b", "FLUX.2 [klein] 4B (Qwen3-4B text features; distilled and base share every shape)"),
    (4096, False): ("flux2-klein-9b", "FLUX.2 [klein] 9B (Qwen3-8B text features; distilled, base and KV share every shape)"),
}


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's family, variant, layout, dtypes and size, as read off its header."""

    family: str  # a key of FAMILY_NAMES
    variant: str | None  # "flux-dev", "flux-schnell", "flux-fill", "z-image-omni", "flux-vae", ...; None when the keys cannot say
    description: str  # one human sentence naming what it is
    layout: str  # "official", "ComfyUI", "diffusers" or "transformers"
    dtypes: dict[str, int]  # dtype name -> number of parameters stored in it
    params: int

    def lines(self) -> list[str]:
        """A short human-readable summary, one fact per line."""
        shares = sorted(self.dtypes.items(), key=lambda kv: -kv[1])
        dtypes = ", ".join(name if len(shares) == 1 else f"{name} ({count / self.params:.1%})" for name, count in shares) or "none"
        return [f"family:     {FAMILY_NAMES[self.family]}", f"what:       {self.description}",
                f"layout:     {self.layout}", f"dtype:      {dtypes}", f"parameters: {parameters(self.params)}"]


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's (dtype, shape) in the checkpoint at `path` (file, index or folder), without loading any."""
    specs = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="numpy") as f:  # numpy, not torch: headers in milliseconds, no torch import
                for key in f.keys():
                    tensor = f.get_slice(key)
                    specs[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"cannot read the safetensors header of {file}: {e}") from e
    return specs


def identify(path: str | Path) -> CheckpointInfo:
    """Name the checkpoint at `path` (a .safetensors file, a sharded index or a folder) from its header."""
    specs = read_header(path)
    comfy = any(k.startswith(COMFY_PREFIX) for k in specs)
    shapes = {k.removeprefix(COMFY_PREFIX): shape for k, (_, shape) in specs.items()}
    family, variant, description, layout = _classify(shapes, lambda key: read_tensor(path, key), named_variant(path))
    mode = flux2_mode(path) if family == "flux.2" else None
    if mode is not None and variant in ("flux2-klein-4b", "flux2-klein-9b"):
        variant, description = flux2_variant(variant, mode), f"{description}; {FLUX2_MODES[mode]}"
    if comfy and layout == "official":
        layout = "ComfyUI"
    dtypes: dict[str, int] = {}
    for dtype, shape in specs.values():
        name = DTYPE_NAMES.get(dtype, dtype.lower())
        dtypes[name] = dtypes.get(name, 0) + _numel(shape)
    return CheckpointInfo(family, variant, description, layout, dtypes, sum(dtypes.values()))


def named_variant(path: str | Path) -> str | None:
    """The FLUX.1 variant that the name of `path`, or the snapshot its folder sits in, gives (None: nothing names one)."""
    path = Path(path)
    index = path.parent / "model_index.json"
    if path.is_dir() and index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name in SNAPSHOT_CLASSES:
            return SNAPSHOT_CLASSES[class_name]
    return next((variant for word, variant in NAME_WORDS.items() if word in path.name.lower()), None)


def read_tensor(path: str | Path, key: str) -> Tensor:
    """The one tensor `key` of the checkpoint at `path`."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise CheckpointError(f"{path} holds no tensor {key}")


def check_family(path: str | Path, family: str, hint: str = "") -> CheckpointInfo:
    """identify(path), raising CheckpointError when it is not of `family` (`hint` says what to do instead)."""
    info = identify(path)
    if info.family != family:
        raise CheckpointError(f"{path} holds {info.description}, not {FAMILY_NAMES[family]}{hint}")
    return info


def parameters(n: int) -> str:
    """A parameter count in words: 590,816 (0.59 M), 6,154,908,736 (6.15 B)."""
    unit, scale = ("B", 1e9) if n >= 1e9 else ("M", 1e6)
    return f"{n:,} ({n / scale:.2f} {unit})"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _classify(shapes: dict[str, tuple[int, ...]], tensor: Callable[[str], Tensor],
              named: str | None = None) -> tuple[str, str | None, str, str]:
    """(family, variant, description, layout) from key names and shapes (any ComfyUI prefix removed); `tensor` reads
    one; `named` is the variant the checkpoint's name gives, if any."""
    has = shapes.__contains__
    if has("control_all_x_embedder.2-1.weight"):  # the published names are diffusers'
        blocks = len({k.split(".")[1] for k in shapes if k.startswith("control_layers.")})
        if has("control_layers.14.adaLN_modulation.0.weight"):
            refiner = "control_noise_refiner.0.before_proj.weight"
            variant = "z-image-turbo-controlnet-" + ("2.1" if has(refiner) and tensor(refiner).any() else "2.0")
        elif blocks == 6:
            variant = "z-image-turbo-controlnet"
        else:
            return "z-image-controlnet", None, f"a Z-Image ControlNet with {blocks} control blocks (no published variant)", "official"
        return "z-image-controlnet", variant, CONTROLNETS[variant], "official"
    if has("cap_embedder.1.weight"):
        layout = "diffusers" if has("all_x_embedder.2-1.weight") else "official"
        if has("siglip_embedder.1.weight"):
            width = shapes["siglip_embedder.1.weight"][1]
            what = f"Z-Image Omni (text to image and editing with condition images; SigLIP2 width {width})"
            return "z-image", "z-image-omni", what, layout
        return "z-image", None, "a Z-Image transformer (Turbo or base: they share every shape)", layout
    if has("double_blocks.0.img_mod.lin.weight") or has("single_transformer_blocks.0.proj_mlp.weight"):
        return ("flux.1", *_flux_variant(shapes, named))
    if has("single_stream_modulation.lin.weight") or has("single_stream_modulation.linear.weight"):
        return ("flux.2", *_flux2_variant(shapes))
    if has("decoder.conv_in.weight"):
        channels = shapes["decoder.conv_in.weight"][1]
        layout = "diffusers" if any(k.startswith("decoder.up_blocks.") for k in shapes) else "official"
        if channels == 16:
            return "autoencoder", "flux-vae", "the 16-channel FLUX.1 / Z-Image autoencoder", layout
        if channels == 32 and has("bn.running_mean"):
            return "autoencoder", "flux2-vae", "the 32-channel FLUX.2 autoencoder (with batch-norm latent statistics)", layout
        return "autoencoder", None, f"a {channels}-channel autoencoder (FLUX.1 and Z-Image use 16 channels, FLUX.2 32)", layout
    if has("encoder.block.0.layer.0.SelfAttention.q.weight"):
        return "t5", None, "a T5 text encoder", "transformers"
    if any(k.endswith("embeddings.patch_embedding.weight") and len(shape) == 2 for k, shape in shapes.items()):
        return "siglip2", None, "a SigLIP2 vision encoder (Z-Image Omni's image features)", "transformers"  # CLIP's patches are a conv
    if any(k.endswith("embeddings.position_embedding.weight") for k in shapes):  # with or without the text_model. prefix
        return "clip", None, "a CLIP text encoder", "transformers"
    if has("model.layers.0.self_attn.q_norm.weight") or has("layers.0.self_attn.q_norm.weight"):
        return "qwen3", None, "a Qwen3 language model (text encoder)", "transformers"
    if any(k.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for k in shapes):
        return "mistral3", None, "a Mistral 3 language model (FLUX.2 dev's text encoder)", "transformers"
    return "unknown", None, "no model this tool knows (not Z-Image, FLUX.1, FLUX.2, their autoencoders or text encoders)", "unknown"


def _flux_variant(shapes: dict[str, tuple[int, ...]], named: str | None) -> tuple[str | None, str, str]:
    """(variant, description, layout) of a FLUX.1 transformer; `named` tells the variants that share shapes apart."""
    official = shapes.__contains__("img_in.weight")
    in_channels = shapes["img_in.weight" if official else "x_embedder.weight"][1]
    guidance = "guidance_in.in_layer.weight" in shapes or "time_text_embed.guidance_embedder.linear_1.weight" in shapes
    layout = "official" if official else "diffusers"
    if in_channels not in FLUX_TOOLS:
        return None, f"a FLUX.1 transformer with {in_channels} input channels (no known variant)", layout
    tool = FLUX_TOOLS[in_channels]
    if tool == "flux-fill":
        return tool, "FLUX.1 Fill (inpainting: 64 noise + 64 masked-image + 256 mask input channels)", layout
    if tool and named in ("flux-canny", "flux-depth"):
        return named, f"FLUX.1 {named.removeprefix('flux-').title()} (64 noise + 64 control input channels; named so)", layout
    if tool:
        return tool, ("FLUX.1 Canny or Depth (64 noise + 64 control input channels; the two share every shape and "
                      "nothing here names either)"), layout
    if guidance and named == "flux-kontext":
        return named, "FLUX.1 Kontext (in-context editing; dev's shapes, named Kontext)", layout
    if guidance:
        return "flux-dev", "FLUX.1 dev (guidance-distilled; Kontext has the same shapes and nothing here names it Kontext)", layout
    return "flux-schnell", "FLUX.1 schnell (timestep-distilled, no guidance input)", layout


def flux2_mode(path: str | Path) -> str | None:
    """How a FLUX.2 klein checkpoint in a diffusers snapshot runs, from the snapshot's model_index.json ("distilled",
    "base" or "kv"; None for [dev] or outside a snapshot). Looked for beside `path` and one folder up (a file inside
    transformer/), as BFL's repositories hold both their single file and the diffusers folders."""
    path = Path(path)
    index = next((folder / "model_index.json" for folder in (path.parent, path.parent.parent)
                  if (folder / "model_index.json").is_file()), None)
    if index is None:
        return None
    try:
        config = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index} is not JSON: {e}") from e
    if config.get("_class_name") == "Flux2KleinKVPipeline":
        return "kv"
    if str(config.get("_class_name", "")).startswith("Flux2Klein"):
        return "distilled" if config.get("is_distilled", False) else "base"
    return None


def flux2_variant(checkpoint: str, mode: str) -> str:
    """The variant name of a klein checkpoint ("flux2-klein-4b", "flux2-klein-9b") run in `mode` (see flux2_mode)."""
    size = checkpoint.removeprefix("flux2-klein-")
    return {"distilled": checkpoint, "base": f"flux2-klein-base-{size}", "kv": f"{checkpoint}-kv"}[mode]


def _flux2_variant(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str, str]:
    """(variant, description, layout) of a FLUX.2 transformer, from its width and the guidance embedder."""
    official = "single_stream_modulation.lin.weight" in shapes
    width = shapes["img_in.weight" if official else "x_embedder.weight"][0]
    guidance = "guidance_in.in_layer.weight" in shapes or "time_guidance_embed.guidance_embedder.linear_1.weight" in shapes
    layout = "official" if official else "diffusers"
    variant, description = FLUX2_WIDTHS.get((width, guidance), (None, f"a FLUX.2 transformer of width {width} (no known variant)"))
    return variant, description, layout
