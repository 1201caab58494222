"""Safetensors checkpoints: find the files, read them onto the target device, load strictly.

A checkpoint is one `.safetensors` file, a sharded set described by `*.safetensors.index.json`, or
a folder holding either (a diffusers `transformer/` folder, say). Models are built on the meta
device and receive the checkpoint's tensors directly (`assign=True`), so weights are read once,
straight into the device and dtype they will be used in.
"""

import json
from dataclasses import fields
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's prefix on every transformer key of an official-layout file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


def safetensors_files(path: str | Path) -> list[Path]:
    """The .safetensors files that make up the checkpoint at `path` (file, index file or folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            path = indexes[0]
        elif len(indexes) > 1:
            raise CheckpointError(f"{path} holds several index files: {', '.join(p.name for p in indexes)}")
        elif len(files) == 1:
            return files
        else:
            found = ", ".join(p.name for p in files) or "none"
            raise CheckpointError(f"{path} must hold one .safetensors file or an index; found {found}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path} is not a safetensors index (no readable 'weight_map')") from e
        shards = [path.parent / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{path} names shards that are not there: {', '.join(missing)}")
        return shards
    return [path]


def read_state_dict(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read every tensor of the checkpoint at `path` onto `device`, cast to `dtype` one tensor at a time."""
    state_dict = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state_dict[key] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return state_dict


def config_from_dict(cls: type[T], config: dict) -> T:
    """A config dataclass from a diffusers config.json dict: its own fields only (JSON lists as tuples), the
    bookkeeping keys (`_class_name`, `_diffusers_version`, ...) and options it does not model ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})


def read_config(path: str | Path, parse: Callable[[dict], T]) -> T | None:
    """The diffusers config.json inside (or beside) the checkpoint at `path`, read by `parse`; None if there is none.

    A file that is not JSON, or a config that `parse` refuses with a ValueError, is a CheckpointError naming the file.
    """
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        return None
    try:
        return parse(json.loads(config.read_text()))
    except ValueError as e:  # json.JSONDecodeError is one
        raise CheckpointError(f"{config}: {e}") from e


def shape_of(state_dict: dict[str, Tensor], key: str, model: str) -> tuple[int, ...]:
    """The shape of `state_dict[key]`; a CheckpointError if absent (the config of `model` cannot be read off the keys)."""
    if key not in state_dict:
        raise CheckpointError(f"cannot infer the {model} config: the checkpoint has no {key}")
    return tuple(state_dict[key].shape)


def count_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix.N.*` the checkpoint holds."""
    return len({k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")})


def save_state_dict(state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Write a state dict as one safetensors file."""
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def check_keys(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected.keys() & state_dict.keys()
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{title} ({len(keys)}): " + ", ".join(keys)
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a model without allocating its parameters."""
    with torch.device("meta"):
        return factory()


def param_count(factory: Callable[[], nn.Module]) -> int:
    """Number of parameters of the model `factory` builds, counted on the meta device (nothing allocated)."""
    return sum(p.numel() for p in build_on_meta(factory).parameters())


def load_into(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load `state_dict` into `model` (typically on meta), taking its tensors as the parameters."""
    check_keys(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, build: Callable[[T], M], convert: Callable[[dict[str, Tensor]], dict[str, Tensor]], *,
               parse_config: Callable[[dict], T], infer_config: Callable[[dict[str, Tensor]], T], cfg: T | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> M:
    """Load the model `build(cfg)` from the checkpoint at `path` (file, index or folder), in any layout `convert` accepts.

    The config is `cfg`, else the config.json beside the weights (read by `parse_config`, before the
    weights, so that a bad one fails fast), else `infer_config` of the converted state dict. The
    model is built on the meta device and takes the checkpoint's tensors, read once onto `device` in `dtype`.
    """
    cfg = cfg or read_config(path, parse_config)
    state_dict = convert(read_state_dict(path, device, dtype))
    cfg = cfg or infer_config(state_dict)
    return load_into(build_on_meta(lambda: build(cfg)), state_dict, source=str(path))
