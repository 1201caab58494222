"""The 32-channel FLUX.2 autoencoder: parity with diffusers' AutoencoderKLFlux2 (encode's posterior mean,
decode, and the pipelines' 2x2 patchify + batch-norm standardization), layouts, loading, presets.

Tolerance: fp32 on the CPU, relative error <= 1e-5 (as tests/test_vae.py: the same convolutions,
GroupNorms and attention; only the 1x1 projections reach the GEMM differently).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from safetensors.torch import save_file

from zflux.common.identify import identify
from zflux.common.vae import PRESETS, Autoencoder, AutoencoderConfig, from_diffusers, load_autoencoder, to_diffusers
from zflux.common.weights import param_count
from test_vae import diffusers_config
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)
from util import randomize_, rel_err, shapes

TINY = AutoencoderConfig(latent_channels=32, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         scaling_factor=1.0, shift_factor=0.0, use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2))


def flux2_config(cfg: AutoencoderConfig) -> dict:
    return diffusers_config(cfg, dropped=("scaling_factor", "shift_factor"))


def diffusers_vae(cfg: AutoencoderConfig = TINY, seed: int = 0) -> AutoencoderKLFlux2:
    """A random AutoencoderKLFlux2, its batch-norm statistics random too (mean around 0, variance around 1)."""
    ref = randomize_(AutoencoderKLFlux2(**flux2_config(cfg)), seed, std=0.2).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ref.bn.running_mean.copy_(torch.randn(ref.bn.running_mean.shape, generator=g) * 0.5)
    ref.bn.running_var.copy_(torch.rand(ref.bn.running_var.shape, generator=g) + 0.5)
    return ref


def ours_from(ref: AutoencoderKLFlux2, cfg: AutoencoderConfig = TINY) -> Autoencoder:
    ours = Autoencoder(cfg)
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    return ours.eval()


@pytest.mark.parametrize("B, H, W", [(1, 32, 32), (2, 32, 48)])
@torch.no_grad()
def test_encode_normalize_and_decode_match_diffusers(B, H, W):
    """encode + normalize = Flux2KleinPipeline._encode_vae_image; denormalize + decode = the pipeline's output path."""
    ref = diffusers_vae()
    ours = ours_from(ref)
    image = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pipe = SimpleNamespace(vae=ref, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    expected = Flux2KleinPipeline._encode_vae_image(pipe, image, generator=None)  # (B, 128, H/16, W/16)
    latent = ours.normalize(ours.encode(image))
    assert latent.shape == expected.shape == (B, 128, H // 16, W // 16)
    assert rel_err(latent, expected) <= 1e-5
    assert rel_err(ours.encode(image), ref.encode(image).latent_dist.mode()) <= 1e-5

    z = torch.randn(B, 128, H // 16, W // 16, generator=torch.Generator().manual_seed(2))
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)  # as in Flux2KleinPipeline.__call__
    raw = Flux2KleinPipeline._unpatchify_latents(z * std + ref.bn.running_mean.view(1, -1, 1, 1))
    assert rel_err(ours.denormalize(z), raw) <= 1e-6
    assert rel_err(ours.decode(ours.denormalize(z)), ref.decode(raw).sample) <= 1e-5
    assert rel_err(ours.normalize(ours.denormalize(z)), z) <= 1e-6


def test_full_size_layout_config_and_count():
    """At the real size (meta device): diffusers' keys and shapes both ways, its default config, 84,046,115 parameters."""
    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
        ours = Autoencoder(PRESETS["flux2"])
    assert AutoencoderConfig.from_diffusers({"_class_name": "AutoencoderKLFlux2", **ref.config}) == PRESETS["flux2"]
    assert AutoencoderConfig.from_diffusers({"_class_name": "AutoencoderKLFlux2"}) == PRESETS["flux2"]
    assert shapes(to_diffusers(ours.state_dict())) == shapes(ref.state_dict())
    assert shapes(from_diffusers(ref.state_dict())) == shapes(ours.state_dict())
    assert param_count(lambda: Autoencoder(PRESETS["flux2"])) == sum(p.numel() for p in ref.parameters()) == 84_046_115


@pytest.fixture
def tiny_sd():
    return {k: v.clone() for k, v in ours_from(diffusers_vae()).state_dict().items()}


def test_round_trip_and_quant_conv_keys(tiny_sd):
    theirs = to_diffusers(tiny_sd)
    assert torch.equal(theirs["quant_conv.weight"], tiny_sd["encoder.quant_conv.weight"])
    assert torch.equal(theirs["post_quant_conv.bias"], tiny_sd["decoder.post_quant_conv.bias"])
    assert torch.equal(theirs["bn.running_var"], tiny_sd["bn.running_var"])
    back = from_diffusers(theirs)
    assert back.keys() == tiny_sd.keys() and all(torch.equal(back[k], v) for k, v in tiny_sd.items())


def test_loads_bfl_file_and_diffusers_folder(tmp_path, tiny_sd):
    save_file(tiny_sd, tmp_path / "ae.safetensors")
    AutoencoderKLFlux2(**flux2_config(TINY)).eval().save_pretrained(tmp_path / "vae")
    save_file(to_diffusers(tiny_sd), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    for path, cfg in ((tmp_path / "ae.safetensors", TINY), (tmp_path / "vae", None)):
        model = load_autoencoder(path, dtype=torch.float32, cfg=cfg)
        assert model.cfg == TINY
        assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_sd.items())
    info = identify(tmp_path / "ae.safetensors")
    assert (info.family, info.variant, info.layout) == ("autoencoder", "flux2-vae", "official")
    assert identify(tmp_path / "vae").layout == "diffusers"


def test_flux1_autoencoder_has_no_latent_statistics():
    with pytest.raises(ValueError, match="keeps no latent statistics"):
        Autoencoder(AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=4)).normalize(torch.zeros(1, 16, 2, 2))
