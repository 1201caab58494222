"""The memory estimate (common/memory.py) against what a full-size run allocates on the GPU.

Random bf16 weights at the real shapes (left uninitialised: only their size matters), allocated in
bf16 straight away, then one transformer call at 1024 x 1024 (Z-Image with its two CFG rows) and
the autoencoder's decode, each stage's activations measured as its peak above the resident weights.
(The first version of this test materialised the weights in fp32 before casting them, so its "peak"
was the fp32 weights: 23.1 GiB for Z-Image's 6.15 B parameters, 44.4 GiB for FLUX.1's 11.9 B; the
activations it reported were those weights' second half, not activations.) The printed numbers are
what TOKEN_ACTIVATION_ELEMENTS and DECODE_ELEMENTS_PER_PIXEL are calibrated from; each estimate must
be within a factor 2 of its measurement. Text encoders are left out.
"""

import pytest
import torch

from zflux.common.memory import Footprint, gib
from zflux.common.vae import PRESETS as AUTOENCODERS
from zflux.common.vae import Autoencoder
from zflux.common.weights import build_on_meta
from zflux.flux.model import PRESETS as FLUX
from zflux.flux.model import Flux
from zflux.flux.pipeline import img_ids, txt_ids
from zflux.zimg.model import PRESETS as ZIMAGE
from zflux.zimg.model import ZImageTransformer

SIZE = 1024


def on_gpu(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(torch.bfloat16).to_empty(device="cuda").eval()  # bf16 on meta first: no fp32 copy is ever made


def zimage_call(model: ZImageTransformer) -> None:
    cfg = model.cfg
    x = torch.randn(2, 16, SIZE // 8, SIZE // 8, device="cuda")
    model(x, torch.full((2,), 0.5, device="cuda"), cap_feats=torch.randn(2, 512, cfg.cap_feat_dim, device="cuda", dtype=torch.bfloat16))


def flux_call(model: Flux) -> None:
    tokens, h = (SIZE // 16) ** 2, SIZE // 16
    model(torch.randn(1, tokens, 64, device="cuda", dtype=torch.bfloat16), img_ids=img_ids(1, h, h, device="cuda"),
          txt=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16), txt_ids=txt_ids(1, 512, device="cuda"),
          timesteps=torch.full((1,), 0.5, device="cuda"), y=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
          guidance=torch.full((1,), 3.5, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("name, build, call, rows", [
    ("z-image-turbo", lambda: ZImageTransformer(ZIMAGE["z-image-turbo"]), zimage_call, 2),
    ("flux-dev", lambda: Flux(FLUX["flux-dev"]), flux_call, 1)])
@torch.inference_mode()
def test_estimate_per_stage_against_the_measured_peaks(name, build, call, rows):
    torch.cuda.empty_cache()
    transformer, vae = on_gpu(build_on_meta(build)), on_gpu(build_on_meta(lambda: Autoencoder(AUTOENCODERS["flux"])))
    measured = {}
    for stage, run in (("denoise", lambda: call(transformer)),
                       ("decode", lambda: vae.decode(torch.randn(1, 16, SIZE // 8, SIZE // 8, device="cuda", dtype=torch.bfloat16)))):
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        measured[stage] = torch.cuda.max_memory_allocated() - resident
    footprint = Footprint(transformer_params=0, block_params=0, vae_params=0, text_params=0, text_streamed_params=0, pixels=SIZE * SIZE,
                          rows=rows)
    for stage, got in measured.items():
        estimate = footprint.activations(stage, "bf16")
        print(f"\n{name} at {SIZE}x{SIZE}, bf16, {stage}: activations estimated {gib(estimate)}, measured {gib(got)}")
        assert got / 2 <= estimate <= 2 * got
