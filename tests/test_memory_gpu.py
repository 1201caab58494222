"""The memory estimate (common/memory.py) against what a full-size run allocates on the GPU.

Random bf16 weights at the real shapes (left uninitialised: only their size matters), one transformer
call at 1024 x 1024 (Z-Image with its two CFG rows) and the autoencoder's decode. The estimate must
be a floor of the measured peak, so that a run is never refused when it would fit; the printed
ratio is what ACTIVATION_ELEMENTS_PER_PIXEL is calibrated from. Text encoders are left out of both.
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
    return module.to_empty(device="cuda").to(torch.bfloat16).eval()


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
@pytest.mark.parametrize("name, build, call", [("z-image-turbo", lambda: ZImageTransformer(ZIMAGE["z-image-turbo"]), zimage_call),
                                               ("flux-dev", lambda: Flux(FLUX["flux-dev"]), flux_call)])
@torch.inference_mode()
def test_estimate_is_a_floor_of_the_peak(name, build, call):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    transformer, vae = on_gpu(build_on_meta(build)), on_gpu(build_on_meta(lambda: Autoencoder(AUTOENCODERS["flux"])))
    call(transformer)
    vae.decode(torch.randn(1, 16, SIZE // 8, SIZE // 8, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    params = sum(p.numel() for module in (transformer, vae) for p in module.parameters())
    estimate = Footprint(model_params=params, text_params=0, pixels=SIZE * SIZE).bytes(torch.bfloat16, offload_text_encoder=False)
    print(f"\n{name} at {SIZE}x{SIZE}, bf16: estimate {gib(estimate)}, peak {gib(peak)}, "
          f"activations estimated {gib(estimate - 2 * params)}, measured {gib(peak - 2 * params)}")
    assert estimate <= peak
