"""What a LoRA file holds, read off its safetensors header alone (no torch: `zflux info` stays fast); common/lora.py applies it.

The formats and how their keys are spelled: see common/lora.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from zflux.common.files import CheckpointError
from zflux.common.identify import FAMILY_NAMES, read_header

ROLES = {  # key suffix -> the tensor's role; the longer suffixes first (".lora.down.weight" also ends in ".down.weight")
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias", ".lora_down.weight": "down",
    ".lora_up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up", ".down.weight": "down", ".up.weight": "up",
    ".alpha": "alpha",
}
TEXT_PREFIXES = ("text_encoder.", "lora_te1_", "lora_te_", "text_encoders.clip_l.transformer.")
MODEL_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "lora_unet_",
                  "lora_transformer_")
SKIPPED = {  # what diffusers drops with a warning (key part -> what it is)
    "dora_scale": "DoRA magnitudes", ".diff_b": "bias differences", ".diff": "weight differences",
    "text_encoders.t5xxl.": "T5 text-encoder parts", "lora_te2_": "second text-encoder parts", "position_embedding": "position embeddings",
}
NORM_SCALES = (".query_norm.scale", ".key_norm.scale")  # BFL control LoRAs replace these QK-norm weights whole
METADATA_KEY = "lora_adapter_metadata"  # PEFT's adapter config, as diffusers saves it in the safetensors header
FAMILY_MARKERS = [  # (family, words of module names (dots as underscores, "_" before) only its LoRAs carry), most specific first
    ("z-image", ("_layers_", "_noise_refiner", "_context_refiner", "_feed_forward", "_attention_to_", "_attention_qkv",
                 "_cap_embedder", "_t_embedder")),
    ("flux.2", ("_stream_modulation", "_to_qkv_mlp_proj", "_linear_in", "_linear_out", "_time_guidance_embed")),
    ("flux.1", ("_img_mod", "_txt_mod", "_modulation_lin", "_norm1", "_proj_mlp", "_ff_net", "_processor", "_time_text_embed",
                "_vector_in", "_query_norm")),
]
MAX_NAMED = 5  # unmatched module names an error lists


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    return next((name.removeprefix(p) for p in prefixes if name.startswith(p)), None)


def underscored(name: str) -> str:
    return name.replace(".", "_")


@dataclass
class LoraModule:
    """One module's tensors in a LoRA file: their keys by role (down, up, bias, alpha)."""

    part: str  # "transformer" or "text_encoder"
    name: str  # the module as the file names it, its prefix removed
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraFile:
    """What a LoRA file holds, read off its header: the modules it changes and the tensors it replaces."""

    path: Path
    format: str
    modules: list[LoraModule]
    replacements: dict[str, str]  # our parameter -> key (BFL control LoRAs' QK-norm scales)
    shapes: dict[str, tuple[int, ...]]
    metadata: dict
    skipped: dict[str, list[str]]  # what is left out (SKIPPED's words) -> its keys

    @property
    def family(self) -> str:
        """The family the module names look like: a key of identify.FAMILY_NAMES ("unknown" if none)."""
        names = ["_" + underscored(m.name) for m in self.modules if m.part == "transformer"]
        names += ["_" + underscored(name) for name in self.replacements]
        for family, markers in FAMILY_MARKERS:
            if any(marker in name for name in names for marker in markers):
                return family
        return self._flux_generation() or ("flux.1" if self.format in ("XLabs", "BFL control", "fal Kontext") else "unknown")

    def _flux_generation(self) -> str | None:
        """FLUX.1 or FLUX.2 from the MLP widths of BFL-named blocks: linear1 gives 7 (FLUX.1: q, k, v, 4x MLP) or 9
        (FLUX.2: q, k, v, 2 x 3x SwiGLU) times its inputs, a double block's first MLP layer 4 or 6."""
        ratios = {"_linear1": {7: "flux.1", 9: "flux.2"}, "_mlp_0": {4: "flux.1", 6: "flux.2"}}
        for m in self.modules:
            for ending, families in ratios.items():
                if underscored(m.name).endswith(ending):
                    return families.get(self.shapes[m.keys["up"]][0] // self.shapes[m.keys["down"]][1])
        return None

    @property
    def ranks(self) -> list[int]:
        return sorted({self.shapes[m.keys["down"]][0] for m in self.modules})

    @property
    def text_encoder_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.part == "text_encoder"]

    def describe(self) -> list[str]:
        """Lines for `zflux info`: format, family, rank, targets, text-encoder parts."""
        model = [m.name for m in self.modules if m.part == "transformer"]
        kinds = sorted({re.sub(r"(^|[._])\d+(?=[._])", r"\1N", name) for name in model})
        text = self.text_encoder_modules
        lines = [f"LoRA, {self.format} format, for {FAMILY_NAMES[self.family]}",
                 f"rank {', '.join(map(str, self.ranks))}; {len(model)} transformer modules: {', '.join(kinds)}",
                 f"text encoder: {len(text)} modules" if text else "text encoder: none"]
        if self.replacements:
            lines.append(f"replaces {len(self.replacements)} QK-norm scales (a BFL control LoRA)")
        lines += [f"left out: {len(keys)} keys of {what}" for what, keys in self.skipped.items()]
        return lines


def read_lora(path: str | Path) -> LoraFile:
    """The LoRA file at `path`, from its header; a CheckpointError if it is no LoRA or has a tensor without its pair."""
    path = Path(path)
    header = {key: shape for key, (_, shape) in read_header(path).items()}
    if any(".lokr_" in key or ".hada_" in key for key in header):
        raise CheckpointError(f"{path} is a LyCORIS (LoKr / LoHa) file, not a LoRA: zflux loads LoRA files only")
    modules, replacements, skipped = {}, {}, {}
    for key in header:
        what = next((w for part, w in SKIPPED.items() if part in key), None)
        if what is not None:
            skipped.setdefault(what, []).append(key)
            continue
        stripped = key.replace("default.", "")  # PEFT's adapter name
        if stripped.endswith(NORM_SCALES):
            replacements[_strip(stripped, MODEL_PREFIXES) or stripped] = key
            continue
        suffix = next((s for s in ROLES if stripped.endswith(s)), None)
        if suffix is None:
            raise CheckpointError(f"{path} is not a LoRA file: {key} is no LoRA tensor (lora_A / lora_B, lora_down / lora_up, alpha)")
        name = stripped.removesuffix(suffix)
        text = _strip(name, TEXT_PREFIXES)
        part, name = ("text_encoder", text) if text is not None else ("transformer", _strip(name, MODEL_PREFIXES) or name)
        modules.setdefault((part, name), LoraModule(part, name)).keys[ROLES[suffix]] = key
    for module in modules.values():
        if "down" not in module.keys or "up" not in module.keys:
            have = ", ".join(module.keys.values())
            raise CheckpointError(f"{path}: {module.name} has {have} but not both halves of a LoRA (down / A and up / B)")
    if not modules:
        raise CheckpointError(f"{path} is not a LoRA file: it holds no lora_A / lora_B or lora_down / lora_up tensors")
    with safe_open(path, framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
    if any(v for k, v in metadata.items() if k.endswith("use_dora")):
        raise CheckpointError(f"{path} is a DoRA adapter (use_dora in its metadata): zflux loads plain LoRAs")
    return LoraFile(path, _format(header), list(modules.values()), replacements, header, metadata, skipped)


def _format(keys: dict) -> str:
    """The format's name, told apart as diffusers' lora_state_dict tells them (see the module docstring)."""
    def has(test: Callable[[str], bool]) -> bool:
        return any(test(k) for k in keys)

    if has(lambda k: "query_norm.scale" in k):
        return "BFL control"
    if has(lambda k: "processor" in k):
        return "XLabs"
    if has(lambda k: k.startswith("base_model.")):
        return "fal Kontext"
    if has(lambda k: ".lora.down." in k):
        return "Z-Image dot"
    if has(lambda k: k.startswith("lora_transformer_")):
        return "mixture"
    if has(lambda k: ".lora_down." in k):
        return "ComfyUI" if has(lambda k: k.startswith("diffusion_model.")) else "kohya"
    return "ai-toolkit" if has(lambda k: k.startswith("diffusion_model.")) else "diffusers"




def is_lora(path: str | Path) -> bool:
    """Whether the safetensors file at `path` holds LoRA tensors (from its header)."""
    return any(key.replace("default.", "").endswith(tuple(ROLES)) for key in read_header(path))


def lora_flag(text: str) -> tuple[Path, float]:
    """`--lora FILE[:SCALE]` -> (file, scale); without a number after the last colon the scale is 1."""
    path, colon, scale = text.rpartition(":")
    try:
        value = float(scale) if colon else 1.0
    except ValueError:
        return Path(text), 1.0
    if not math.isfinite(value):
        raise ValueError(f"--lora {text}: the scale must be a finite number")
    return Path(path if colon else text), value
