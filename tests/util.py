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


def toy_run(root: Path, train_transformer, name: str, steps: int = 2, **options) -> Path:
    """The whole recipe at 32 pixels, for `steps` steps: the autoencoder (once per `root`), then `train_transformer`
    (train_zimage or train_flux) in root/name, its sample grid cut to two captions; return its snapshot folder."""
    import pytest

    import zflux.common.training as training

    settings = training.TrainSettings(batch_size=2, lr=1e-3, minutes=5, max_steps=steps)
    cpu = torch.device("cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:2])
        vae = root / "vae" / "model"
        if not vae.exists():
            training.train_autoencoder(root / "vae", settings, size=32, device=cpu)
        return train_transformer(root / name, vae, settings, size=32, device=cpu, **options)


def same_weights(snapshot: Path, other: Path, parts: tuple[str, ...]) -> bool:
    """Whether two snapshot folders hold the very same tensors in each of `parts` (subfolders)."""
    from zflux.common.weights import read_state_dict

    for part in parts:
        a, b = read_state_dict(snapshot / part), read_state_dict(other / part)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


CAPTION_VALUES = {"a red circle on a blue background": 1.0, "a green square on a yellow background": -1.0}
CAPTION_BATCH = list(CAPTION_VALUES) * 4  # the batch the toy models learn from


def learn_caption_values(model: torch.nn.Module, call, rule, folder: Path) -> torch.nn.Module:
    """Train `model` for a moment to map each caption of CAPTION_BATCH to latents (16, 4, 4) all equal to its value in
    CAPTION_VALUES; `call(model, latents, time)` runs it on that batch. Return the EMA copy."""
    import itertools

    from zflux.common.training import TrainSettings, flow_loss, train

    latents = torch.tensor([CAPTION_VALUES[c] for c in CAPTION_BATCH]).view(-1, 1, 1, 1).expand(-1, 16, 4, 4)  # (8, 16, 4, 4)
    settings = TrainSettings(batch_size=len(CAPTION_BATCH), lr=1e-2, minutes=5, max_steps=60, warmup=10, ema_decay=0.9)
    return train(model, lambda m, _, g: flow_loss(lambda x, t: call(m, x, t), latents, rule, g), itertools.repeat, settings, folder)


def draws_caption_values(pipe, **options) -> bool:
    """Whether `pipe` samples each caption of CAPTION_VALUES (32 pixels, seed 1) to latents of that value, on average."""
    for caption, value in CAPTION_VALUES.items():
        out = pipe.generate(caption, height=32, width=32, seed=1, output_type="latent", progress=False, **options)  # (1, 16, 4, 4)
        if abs(out.mean().item() - value) >= 0.3:
            return False
    return True
