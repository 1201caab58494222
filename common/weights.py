"""Safetensors checkpoints: find the files, read them onto the target device, load strictly.

A checkpoint is one `.safetensors` file, a sharded set described by `*.safetensors.index.json`, or
a folder holding either (a diffusers `transformer/` folder, say). Models are built on the meta
device and receive the checkpoint's tensors directly (`assign=True`), so weights are read once,
straight into the device and dtype they will be used in.
"""

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from zflux.common.files import COMFY_PREFIX, CheckpointError, atomic_write, safetensors_files  # noqa: F401 (re-exported)
from zflux.common.fp8 import is_quant_key, load_tensor, weight_scale_key
from zflux.common.identify import identify, parameters, read_header

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
MAX_KEYS_NAMED = 10  # per list of missing, unexpected or mis-shaped keys in an error; the count says how many more


def read_state_dict(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read every tensor of the checkpoint at `path` onto `device`, cast to `dtype`, one file at a time; an fp8
    file's (ComfyUI's scaled fp8) weights are multiplied by their scales, which are dropped (see common/fp8.py)."""
    state_dict = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                keys = set(f.keys())
                for key in keys - {k for k in keys if is_quant_key(k)}:
                    scale = weight_scale_key(key, keys)
                    state_dict[key] = load_tensor(f.get_tensor(key), f.get_tensor(scale) if scale else None, dtype)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return state_dict


def config_from_dict(cls: type[T], config: dict) -> T:
    """A config dataclass from a diffusers config.json dict: its own fields only (JSON lists as tuples), the
    bookkeeping keys (`_class_name`, `_diffusers_version`, ...) and options it does not model ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})


def config_to_dict(cfg, class_name: str) -> dict:
    """A config dataclass as a diffusers config.json dict naming `class_name` (config_from_dict's inverse)."""
    return {"_class_name": class_name, **asdict(cfg)}


def save_model_folder(folder: str | Path, state_dict: dict[str, Tensor], config: dict, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A diffusers model folder: `config` as config.json, `state_dict` in `dtype` as diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_state_dict({k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


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
    """Write a state dict as one safetensors file, whole or not at all (see files.atomic_write)."""
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))


def header_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The checkpoint at `path` as meta tensors of its shapes, from its header alone: what key maps and config inference
    need (an fp8 file's scale tensors left out, as `read_state_dict` leaves them)."""
    return {key: torch.empty(shape, device="meta") for key, (_, shape) in read_header(path).items() if not is_quant_key(key)}


def _named(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_NAMED])
    return f"{title} ({len(keys)}): {shown}" + (f" and {len(keys) - MAX_KEYS_NAMED} more" if len(keys) > MAX_KEYS_NAMED else "")


def key_problems(expected: dict[str, Tensor], found: dict[str, Tensor], tolerated: Callable[[str], bool] = lambda key: False) -> str:
    """The missing, unexpected (unless `tolerated`) and mis-shaped keys of `found` against `expected`, in one line ("" if none)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not tolerated(k)]
    misshaped = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in expected if k in found and found[k].shape != expected[k].shape]
    problems = [("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)]
    return "; ".join(_named(title, keys) for title, keys in problems if keys)


def check_keys(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the missing, unexpected and mis-shaped keys (the first few of each, and their counts)."""
    problems = key_problems(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {problems}")


def _in_layout_of(found: dict[str, Tensor], ours: dict[str, Tensor],
                  to_diffusers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None) -> dict[str, Tensor]:
    """`ours` (a state dict in our layout) rewritten in the layout of `found`: ours, ComfyUI's or diffusers', whichever shares most keys."""
    layouts = [ours, {COMFY_PREFIX + k: v for k, v in ours.items()}] + ([to_diffusers(ours)] if to_diffusers else [])
    return max(layouts, key=lambda layout: len(layout.keys() & found.keys()))


def _dropped_by(convert: Callable[[dict[str, Tensor]], dict[str, Tensor]], found: dict[str, Tensor]) -> Callable[[str], bool]:
    """Whether `convert` drops a key of `found` on its own (an unused tensor some files carry)."""
    def dropped(key: str) -> bool:
        try:
            return not convert({key: found[key]})
        except CheckpointError:  # one part of a fused tensor: not dropped, and named as missing its other parts
            return False
    return dropped


def check_header(model: nn.Module, path: str | Path, convert: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                 to_diffusers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 found: dict[str, Tensor] | None = None) -> None:
    """Raise CheckpointError unless the checkpoint at `path` holds exactly `model`'s tensors, reading only its header.

    Keys are named as they are (or would be) in the file: in its own layout, whichever of ours,
    ComfyUI's or diffusers' (`to_diffusers`) it is; tensors that `convert` drops on its own are no
    error. A file whose size is off by more than a tenth says what it looks like instead.
    """
    found = header_state_dict(path) if found is None else found
    expected = _in_layout_of(found, model.state_dict(), to_diffusers)
    problems = key_problems(expected, found, tolerated=_dropped_by(convert, found))
    if not problems:
        return
    name = type(model).__name__
    have, want = sum(t.numel() for t in found.values()), sum(t.numel() for t in expected.values())
    if abs(have - want) > want / 10:
        name = f"{name} ({parameters(want)} parameters): it holds {identify(path).description}, {parameters(have)} parameters"
    raise CheckpointError(f"{path} does not fit {name}; {problems}")


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


def check_model(path: str | Path, build: Callable[[T], M], convert: Callable[[dict[str, Tensor]], dict[str, Tensor]], *,
                parse_config: Callable[[dict], T], infer_config: Callable[[dict[str, Tensor]], T],
                to_diffusers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None, cfg: T | None = None) -> T:
    """The config `load_model` would build the model with, after checking the checkpoint's header against it: reads no tensor.

    The config is `cfg`, else the config.json beside the weights (read by `parse_config`), else
    `infer_config` of the header's shapes in our layout.
    """
    cfg = cfg or read_config(path, parse_config)
    found = header_state_dict(path)
    cfg = cfg or infer_config(convert(found))
    check_header(build_on_meta(lambda: build(cfg)), path, convert, to_diffusers=to_diffusers, found=found)
    return cfg


def load_model(path: str | Path, build: Callable[[T], M], convert: Callable[[dict[str, Tensor]], dict[str, Tensor]], *,
               parse_config: Callable[[dict], T], infer_config: Callable[[dict[str, Tensor]], T], cfg: T | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               to_diffusers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> M:
    """Load the model `build(cfg)` from the checkpoint at `path` (file, index or folder), in any layout `convert` accepts.

    check_model first settles the config and checks the header (a bad config.json or a missing,
    unexpected or mis-shaped key fails before any tensor is read); the model is then built on the
    meta device and takes the checkpoint's tensors, read once onto `device` in `dtype`.
    """
    cfg = check_model(path, build, convert, parse_config=parse_config, infer_config=infer_config, to_diffusers=to_diffusers, cfg=cfg)
    state_dict = convert(read_state_dict(path, device, dtype))
    return load_into(build_on_meta(lambda: build(cfg)), state_dict, source=str(path))
