"""The FLUX.1 tools' input pieces (flux/tools.py) against diffusers' FluxFillPipeline and FluxKontextPipeline methods,
and how a tool's checkpoint is named where its shapes cannot name it.

The pipelines' own prepare_* methods run on a stand-in `self` that carries only what they read (the
packing functions, the autoencoder's scale factors), given latents instead of images, so no model is
needed; outputs must be identical.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from zflux.common.identify import identify
from zflux.common.weights import save_state_dict
from zflux.flux.model import Flux, FluxConfig
from zflux.common.latents import pack_latents
from zflux.flux.pipeline import img_ids
from zflux.flux.tools import (KONTEXT_MAX_AREA, KONTEXT_RESOLUTIONS, REFERENCE_INDEX, Conditioning, fill_conditioning, fill_mask_tokens,
                              kontext_output_size, kontext_reference_size, with_conditioning)


def pipe_stub(cls):
    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0))  # latents are given already scaled
    return SimpleNamespace(vae_scale_factor=8, latent_channels=16, vae=vae, _pack_latents=cls._pack_latents,
                           _prepare_latent_image_ids=cls._prepare_latent_image_ids)


@pytest.mark.parametrize("height, width", [(32, 48), (64, 32)])
def test_fill_conditioning_matches_prepare_mask_latents(height, width):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, height, width, generator=g) > 0.5).float()  # (1, 1, H, W) pixel mask
    masked = torch.randn(1, 16, height // 8, width // 8, generator=g)  # the masked image's scaled latents
    mask_tokens, masked_tokens = FluxFillPipeline.prepare_mask_latents(pipe_stub(FluxFillPipeline), mask, masked, 1, 16, 1, height,
                                                                       width, torch.float32, "cpu", None)
    expected = torch.cat((masked_tokens, mask_tokens), dim=-1)  # as FluxFillPipeline.__call__ joins them
    got = fill_conditioning(masked, mask)
    assert got.shape == (1, height // 16 * width // 16, 320) and torch.equal(got, expected)


def test_fill_mask_channel_order():
    """Within a token: channel 4 * (8 * py + px) + (2 * dy + dx) for pixel (py, px) of the 8x8 block in latent cell (dy, dx)."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 8 + 3, 5] = 1  # latent cell (1, 0) of the only token, pixel (3, 5) of its block
    tokens = fill_mask_tokens(mask)
    assert tokens.shape == (1, 1, 256) and tokens.nonzero().tolist() == [[0, 0, 4 * (8 * 3 + 5) + 2 * 1 + 0]]


def test_with_conditioning():
    """A tool's channels join every token (per token, after its 64); Kontext's reference tokens follow the image tokens."""
    tokens, extra, reference = torch.randn(2, 6, 64), torch.randn(1, 6, 320), torch.randn(1, 4, 64)
    out = with_conditioning(tokens, Conditioning(channels=extra))
    assert out.shape == (2, 6, 384) and torch.equal(out[:, :, :64], tokens) and torch.equal(out[1, :, 64:], extra[0])
    out = with_conditioning(tokens, Conditioning(reference=reference, reference_grid=(2, 2)))
    assert out.shape == (2, 10, 64) and torch.equal(out[:, :6], tokens) and torch.equal(out[1, 6:], reference[0])
    assert with_conditioning(tokens, Conditioning()) is tokens


@pytest.mark.parametrize("reference", [(6, 10), (8, 8)])  # the reference's latent size; the target's is (8, 12)
def test_kontext_reference_tokens_match_prepare_latents(reference):
    g = torch.Generator().manual_seed(1)
    image_latents = torch.randn(1, 16, *reference, generator=g)
    _, expected_tokens, target_ids, expected_ids = FluxKontextPipeline.prepare_latents(
        pipe_stub(FluxKontextPipeline), image_latents, 1, 16, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(0))
    h, w = reference[0] // 2, reference[1] // 2
    assert torch.equal(pack_latents(image_latents), expected_tokens)
    assert torch.equal(img_ids(1, h, w, index=REFERENCE_INDEX)[0].float(), expected_ids)
    assert torch.equal(img_ids(1, 4, 6)[0].float(), target_ids)


def test_kontext_resolutions_are_diffusers():
    assert list(KONTEXT_RESOLUTIONS) == PREFERRED_KONTEXT_RESOLUTIONS
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in KONTEXT_RESOLUTIONS)


def diffusers_reference_size(width: int, height: int) -> tuple[int, int]:
    """The reference's size as FluxKontextPipeline.__call__ computes it ("3. Preprocess image", _auto_resize=True)."""
    image_height, image_width = VaeImageProcessor(vae_scale_factor=16).get_default_height_width(Image.new("RGB", (width, height)))
    aspect_ratio = image_width / image_height
    _, image_width, image_height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return image_width // 16 * 16, image_height // 16 * 16


def test_kontext_reference_size_matches_diffusers():
    sizes = [(w, h) for w in range(16, 2100, 37) for h in range(16, 2100, 41)] + [(1024, 1024), (1500, 1000), (517, 301)]
    assert all(kontext_reference_size(w, h) == diffusers_reference_size(w, h) for w, h in sizes)
    assert kontext_reference_size(1500, 1000) == (1248, 832) and kontext_reference_size(40, 24) == (1456, 720)


def test_kontext_reference_size_refuses_tiny_images():
    with pytest.raises(ValueError, match="at least 16x16"):
        kontext_reference_size(15, 100)


def diffusers_output_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """The output size as the first lines of FluxKontextPipeline.__call__ compute it."""
    aspect_ratio = width / height
    width = round((max_area * aspect_ratio) ** 0.5)
    height = round((max_area / aspect_ratio) ** 0.5)
    return height // 16 * 16, width // 16 * 16


@pytest.mark.parametrize("max_area", [KONTEXT_MAX_AREA, 64 * 48, 512 * 768])
def test_kontext_output_size_matches_diffusers(max_area):
    sizes = [(h, w) for h in range(16, 2100, 48) for w in range(16, 2100, 80)]
    expected = {size: diffusers_output_size(*size, max_area) for size in sizes}
    assert all(kontext_output_size(*size, max_area) == out for size, out in expected.items() if all(out))
    for size in [size for size, out in expected.items() if not all(out)]:  # diffusers would fail later, on an empty latent
        with pytest.raises(ValueError, match="max_area"):
            kontext_output_size(*size, max_area)
    assert kontext_output_size(512, 768) == (832, 1248) and kontext_output_size(64, 48, 64 * 48) == (64, 48)



def tiny_transformer(path, **cfg):
    """Save a tiny random FLUX.1 transformer (BFL layout) at `path`."""
    config = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), **cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(Flux(config).state_dict(), path)
    return path


def test_identify_names_the_tools_that_share_shapes(tmp_path):
    """Kontext has dev's shapes and Canny Depth's: a word in the file name, or the snapshot's pipeline class, tells them apart."""
    dev, control = dict(guidance_embeds=True), dict(in_channels=128, out_channels=64, guidance_embeds=True)
    snapshot = tmp_path / "FLUX.1-Kontext-dev-snapshot"
    tiny_transformer(snapshot / "transformer" / "diffusion_pytorch_model.safetensors", **dev)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    cases = {
        tiny_transformer(tmp_path / "flux1-kontext-dev.safetensors", **dev): "flux-kontext",
        tiny_transformer(tmp_path / "flux1-dev.safetensors", **dev): "flux-dev",
        snapshot / "transformer": "flux-kontext",
        tiny_transformer(tmp_path / "flux1-Canny-dev.safetensors", **control): "flux-canny",
        tiny_transformer(tmp_path / "flux1-depth-dev.safetensors", **control): "flux-depth",
        tiny_transformer(tmp_path / "control.safetensors", **control): "flux-canny-or-depth",
    }
    for path, variant in cases.items():
        assert identify(path).variant == variant, path
    assert "nothing here names it Kontext" in identify(tmp_path / "flux1-dev.safetensors").description
    assert "nothing here names either" in identify(tmp_path / "control.safetensors").description
