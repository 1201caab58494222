"""Offload modes on the GPU at full size (random bf16 weights): the transformer's output in each mode is bit-identical
to the resident one, and block streaming keeps its weights off the device.

Z-Image-Turbo (6 B), FLUX.1-dev (12 B) and FLUX.2 klein 4B, one 1024 x 1024 call each. The text
encoder's own moves (text-encoder mode) are checked on the CPU (tests/test_offload.py): they do not
change the transformer.
"""

import pytest
import torch

from zflux.common.offload import Offload, repeated_blocks
from zflux.common.weights import build_on_meta

DEVICE = torch.device("cuda")


def random_model(factory):
    model = build_on_meta(factory).to(torch.bfloat16).to_empty(device=DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def zimage():
    from zflux.zimg.model import PRESETS, ZImageTransformer

    model = random_model(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    x, t = torch.randn(2, 16, 128, 128, device=DEVICE), torch.full((2,), 0.5, device=DEVICE)
    cap = torch.randn(2, 200, model.cfg.cap_feat_dim, device=DEVICE, dtype=torch.bfloat16)
    return model, lambda: model(x, t, cap)


def flux():
    from zflux.flux.model import PRESETS, Flux
    from zflux.flux.pipeline import img_ids, txt_ids

    model = random_model(lambda: Flux(PRESETS["flux-dev"]))
    args = dict(img=torch.randn(1, 4096, 64, device=DEVICE, dtype=torch.bfloat16), img_ids=img_ids(1, 64, 64, device=DEVICE),
                txt=torch.randn(1, 512, 4096, device=DEVICE, dtype=torch.bfloat16), txt_ids=txt_ids(1, 512, device=DEVICE),
                timesteps=torch.full((1,), 0.5, device=DEVICE), y=torch.randn(1, 768, device=DEVICE, dtype=torch.bfloat16),
                guidance=torch.full((1,), 3.5, device=DEVICE))
    return model, lambda: model(**args)


def flux2_klein():
    from zflux.flux.flux2.model import PRESETS, Flux2
    from zflux.flux.flux2.pipeline import grid_ids, text_ids

    model = random_model(lambda: Flux2(PRESETS["flux2-klein-4b"]))
    img = torch.randn(1, 4096, model.cfg.in_channels, device=DEVICE, dtype=torch.bfloat16)
    txt = torch.randn(1, 512, model.cfg.joint_attention_dim, device=DEVICE, dtype=torch.bfloat16)
    ids = grid_ids(64, 64, device=DEVICE)  # (1, 4096, 4)
    return model, lambda: model(img, ids, txt, text_ids(1, 512, DEVICE), torch.full((1,), 0.5, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("build", [zimage, flux, flux2_klein], ids=["z-image-turbo", "flux-dev", "flux2-klein-4b"])
@pytest.mark.parametrize("mode", ["model", "blocks"])
@torch.inference_mode()
def test_offloaded_transformer_is_bit_identical(build, mode):
    torch.cuda.empty_cache()
    model, call = build()
    resident = call()
    off = Offload(mode, {"transformer": model}, DEVICE)
    if mode == "model":
        off.enter("encode")
        assert all(p.device.type == "cpu" for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with off.stage("denoise"):
        offloaded = call()
    torch.cuda.synchronize()
    assert torch.equal(offloaded, resident)
    if mode == "blocks":
        blocks = repeated_blocks(model)
        # parked again after each call, but the first block: its copy for the next call starts during the last block
        assert all(p.device.type == "cpu" for b in blocks[1:] for p in b.parameters())
        block_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
        print(f"\n{build.__name__} blocks mode: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
              f"blocks {block_bytes / 2**30:.1f} GiB streamed")
