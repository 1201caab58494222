"""Helpers shared by the tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def shapes(state_dict: dict) -> dict:
    """Each tensor's shape, by key."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def write_sharded_folder(folder: Path, state_dict: dict, config: dict) -> Path:
    """A diffusers model folder: config.json and `state_dict` split over two shards named in an index file."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(state_dict)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save_file({k: state_dict[k] for k in part}, folder / name)
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with N(0, std) (norm weights around 1) so that no path is trivially zero."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=device) * std
            is_norm = p.ndim == 1 and any(s in name for s in ("norm", "scale"))
            p.copy_(noise + 1 if is_norm else noise)
    return module


def bf16_vs_fp32(ref32: torch.nn.Module, run_ref, make_ours, run_ours) -> tuple[float, float]:
    """Errors against the fp32 reference of (diffusers in bf16, ours in bf16), holding few copies at once.

    `ref32` is the reference model in fp32 on its device; `make_ours(state_dict)` builds our model from
    the bf16 reference's state dict; `run_ref(model)` / `run_ours(model)` return outputs.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        expected = run_ref(ref32).float()
        ref16 = ref32.to(torch.bfloat16)  # in place: the fp32 copy is gone from here on
        err_ref = rel_err(run_ref(ref16), expected)
        ours = make_ours(ref16.state_dict())
        del ref16
        err_ours = rel_err(run_ours(ours), expected)
    return err_ref, err_ours
