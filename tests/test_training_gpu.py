"""Training on the GPU: the shipped configs at 64 pixels, bf16 autocast, the sdpa backend, a few dozen steps of each run.

What it checks that the CPU tests cannot: the autocast path (bf16 matmuls, fp32 master weights and losses), the
CUDA generators, the data workers feeding a GPU, and that the loss falls. Each run takes well under a minute.
"""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from zflux.common.training import AUTOENCODER_SETTINGS, train_autoencoder
from zflux.flux.training import SETTINGS as FLUX_SETTINGS
from zflux.flux.training import train_flux
from zflux.zimg.training import SETTINGS as ZIMAGE_SETTINGS
from zflux.zimg.training import train_zimage

SIZE = 64
STEPS = 60


def falls(folder) -> bool:
    """Whether the logged loss is finite and its last 10 steps average below its first 10."""
    losses = load_file(folder / "state.safetensors")["losses"]
    return bool(torch.isfinite(losses).all()) and losses[-10:].mean() < losses[:10].mean()


@pytest.mark.gpu
def test_runs_train_on_the_gpu(tmp_path):
    device = torch.device("cuda")
    short = dict(max_steps=STEPS, minutes=2.0, sample_every=STEPS)
    vae = train_autoencoder(tmp_path / "autoencoder", replace(AUTOENCODER_SETTINGS, **short), size=SIZE, device=device, workers=4)
    assert falls(tmp_path / "autoencoder")
    for name, run, defaults in (("z-image-turbo", train_zimage, ZIMAGE_SETTINGS), ("flux-dev", train_flux, FLUX_SETTINGS)):
        run(tmp_path / name, vae, replace(defaults, **short), size=SIZE, device=device, workers=4)
        assert falls(tmp_path / name), name
        assert (tmp_path / name / "grid.png").is_file() and (tmp_path / name / f"samples-{STEPS:06d}.png").is_file()
