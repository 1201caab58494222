"""The KL autoencoder: parity with diffusers' AutoencoderKL, BFL <-> diffusers layouts, loading, named errors.

Tolerance: fp32 on the CPU, relative error <= 1e-5. Both sides run the same convolutions, GroupNorms
and attention in the same precision; the only difference is how the 1x1 attention projections reach
the GEMM, which leaves errors around 1e-7 to 1e-6.
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from torch.nn import functional as F

from zflux.common.vae import PRESETS, Autoencoder, AutoencoderConfig, Upsample, from_diffusers, load_autoencoder, to_diffusers
from zflux.common.weights import CheckpointError
from util import randomize_, rel_err, shapes

TWO_LEVELS = AutoencoderConfig(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
FOUR_LEVELS = AutoencoderConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)  # FLUX's shape, narrow

# black-forest-labs/FLUX.1-dev vae/config.json (Z-Image ships the same autoencoder)
FLUX_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
    "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


def diffusers_config(cfg: AutoencoderConfig, dropped: tuple[str, ...] = ("patch_size", "batch_norm_eps")) -> dict:
    """The diffusers AutoencoderKL arguments for `cfg` (without the fields its class does not take: `dropped`)."""
    n = len(cfg.block_out_channels)
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items() if k not in dropped},
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def diffusers_vae(cfg: AutoencoderConfig, seed: int = 0, std: float = 0.1) -> AutoencoderKL:
    """A diffusers AutoencoderKL at `cfg` with random weights (on the current default device)."""
    return randomize_(AutoencoderKL(**diffusers_config(cfg)), seed, std).eval()


def ours_from(ref: AutoencoderKL, cfg: AutoencoderConfig) -> Autoencoder:
    with torch.device("meta"):
        ours = Autoencoder(cfg)
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True, assign=True)
    return ours.eval()


@pytest.mark.parametrize("cfg, B, H, W", [(TWO_LEVELS, 2, 24, 40), (FOUR_LEVELS, 2, 48, 32), (FOUR_LEVELS, 1, 64, 64)])
def test_parity_with_diffusers(cfg, B, H, W):
    ref = diffusers_vae(cfg)
    ours = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(B, 3, H, W, generator=g) * 2 - 1
    latent = torch.randn(B, cfg.latent_channels, H // cfg.downscale, W // cfg.downscale, generator=g)
    with torch.no_grad():
        want_mean, want_image = ref.encode(image).latent_dist.mean, ref.decode(latent).sample
    mean, decoded = ours.encode(image), ours.decode(latent)
    assert mean.shape == want_mean.shape == (B, cfg.latent_channels, H // cfg.downscale, W // cfg.downscale)
    assert decoded.shape == want_image.shape == (B, 3, H, W)
    assert rel_err(mean, want_mean) < 1e-5
    assert rel_err(decoded, want_image) < 1e-5


def test_config_from_diffusers_and_presets():
    assert AutoencoderConfig.from_diffusers(FLUX_CONFIG) == PRESETS["flux"]
    for cfg in (TWO_LEVELS, FOUR_LEVELS):
        with torch.device("meta"):
            assert AutoencoderConfig.from_diffusers(dict(AutoencoderKL(**diffusers_config(cfg)).config)) == cfg
    assert PRESETS["flux"].downscale == 8


@pytest.mark.parametrize("change, message", [
    ({"decoder_block_out_channels": [8, 8, 8, 8]}, "decoder_block_out_channels"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention=False"),
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"_class_name": "AutoencoderTiny"}, "config is for AutoencoderTiny, not AutoencoderKL or AutoencoderKLFlux2"),
    ({"norm_num_groups": 24}, "must be multiples of norm_num_groups 24"),
])
def test_unsupported_configs_are_named(change, message):
    config = {**FLUX_CONFIG, **change}
    config = {k: v for k, v in config.items() if v is not None}  # None: the key is absent (diffusers' default applies)
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig.from_diffusers(config)


@pytest.fixture
def tiny_sd():
    return {k: v.clone() for k, v in randomize_(Autoencoder(FOUR_LEVELS)).state_dict().items()}


def test_round_trip_is_exact(tiny_sd):
    with torch.device("meta"):
        expected = AutoencoderKL(**diffusers_config(FOUR_LEVELS)).state_dict()
    theirs = to_diffusers(tiny_sd)
    assert shapes(theirs) == shapes(expected)
    back = from_diffusers(theirs)
    assert back.keys() == tiny_sd.keys() and all(torch.equal(back[k], v) for k, v in tiny_sd.items())
    again = to_diffusers(back)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], v) for k, v in theirs.items())
    assert all(torch.equal(from_diffusers(tiny_sd)[k], v) for k, v in tiny_sd.items())  # ours passes through unchanged
    assert theirs["decoder.up_blocks.0.upsamplers.0.conv.weight"] is tiny_sd["decoder.up.3.upsample.conv.weight"]
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)


def test_our_layout_through_diffusers_single_file_converter(tiny_sd):
    """diffusers' own BFL/LDM -> diffusers converter turns our state dict into exactly what to_diffusers gives."""
    converted = convert_ldm_vae_checkpoint(dict(tiny_sd), diffusers_config(FOUR_LEVELS))
    ours = to_diffusers(tiny_sd)
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], v) for k, v in ours.items())
    AutoencoderKL(**diffusers_config(FOUR_LEVELS)).load_state_dict(converted, strict=True)


def test_full_size_layout_matches_diffusers():
    cfg = AutoencoderConfig.from_diffusers(FLUX_CONFIG)
    with torch.device("meta"):
        ours = Autoencoder(cfg).state_dict()
        ref = AutoencoderKL(**FLUX_CONFIG).state_dict()
    assert shapes(convert_ldm_vae_checkpoint(dict(ours), FLUX_CONFIG)) == shapes(ref)
    assert shapes(to_diffusers(ours)) == shapes(ref)
    n = sum(v.numel() for v in ours.values())
    print(f"FLUX autoencoder: {len(ours)} tensors, {n / 1e6:.2f} M parameters")
    assert len(ours) == 244 and n == 83_819_683


def test_loads_bfl_file_diffusers_folder_and_diffusers_file(tmp_path, tiny_sd):
    save_file(tiny_sd, tmp_path / "ae.safetensors")
    ref = AutoencoderKL(**diffusers_config(FOUR_LEVELS))
    ref.load_state_dict(to_diffusers(tiny_sd))
    ref.save_pretrained(tmp_path / "vae")  # diffusers' own folder: config.json + diffusion_pytorch_model.safetensors
    (tmp_path / "single").mkdir()
    save_file(to_diffusers(tiny_sd), tmp_path / "single" / "vae.safetensors")

    a = load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.float32, cfg=FOUR_LEVELS)
    b = load_autoencoder(tmp_path / "vae", dtype=torch.float32)
    c = load_autoencoder(tmp_path / "single" / "vae.safetensors", dtype=torch.float32, cfg=FOUR_LEVELS)
    assert b.cfg == FOUR_LEVELS
    for model in (a, b, c):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_sd.items())
    assert load_autoencoder(tmp_path / "ae.safetensors", cfg=FOUR_LEVELS).dtype == torch.bfloat16


def test_bfl_file_without_config_is_the_flux_preset(tmp_path):
    """No config.json: the FLUX preset; a small file then fails with its mis-shaped keys named."""
    save_file({k: v for k, v in Autoencoder(TWO_LEVELS).state_dict().items()}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="does not fit Autoencoder"):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_foreign_config_is_named(tmp_path, tiny_sd):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 19}))
    save_file(tiny_sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="config is for FluxTransformer2DModel, not AutoencoderKL"):
        load_autoencoder(folder)


@pytest.mark.parametrize("method, shape, message", [
    ("encode", (1, 4, 16, 16), r"image must be \(B, 3, H, W\), got \(1, 4, 16, 16\)"),
    ("encode", (3, 16, 16), r"image must be \(B, 3, H, W\), got \(3, 16, 16\)"),
    ("encode", (1, 3, 16, 20), "image height 16 and width 20 must be multiples of 8"),
    ("decode", (1, 4, 2, 2), r"latent must be \(B, 16, H, W\), got \(1, 4, 2, 2\)"),
])
def test_bad_inputs_are_named(method, shape, message):
    model = Autoencoder(FOUR_LEVELS).eval()
    with pytest.raises(ValueError, match=message):
        getattr(model, method)(torch.zeros(shape))


def test_inference_only_and_dtype_follows_the_model():
    """encode/decode build no autograd graph and take inputs in any float dtype."""
    model = Autoencoder(FOUR_LEVELS).eval()
    out = model.decode(torch.randn(1, 16, 2, 2, dtype=torch.float64))
    assert out.dtype == torch.float32 and not out.requires_grad
    assert not model.encode(torch.zeros(1, 3, 16, 16)).requires_grad


def test_posterior_sample_matches_diffusers():
    """With noise, encode gives diffusers' latent_dist.sample(generator) for the same draws (its img2img path)."""
    ref = diffusers_vae(TWO_LEVELS)
    ours = ours_from(ref, TWO_LEVELS)
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(image).latent_dist.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    assert rel_err(ours.encode(image, noise), want) < 1e-5
    with pytest.raises(ValueError, match=r"noise must have the latent's shape \(2, 4, 8, 12\), got \(2, 4, 8, 8\)"):
        ours.encode(image, noise[..., :8])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_upsample_by_phases_is_nearest_then_conv(channels_last):
    """The decoder's Upsample convolves the four output phases with collapsed 2x2 kernels (common/vae.py): in float64 the
    same numbers as the nearest x2 upsample followed by the 3x3 conv, in the input's memory format, with gradients."""
    torch.manual_seed(0)
    up = Upsample(8).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (2, 8, 10, 14)
    out = up(x)
    assert out.shape == expected.shape and (out - expected).abs().max() <= 1e-12
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_(True)
    grad = torch.autograd.grad(up(x).square().sum(), x)[0]
    assert torch.allclose(grad, torch.autograd.grad(up.conv(F.interpolate(x, scale_factor=2.0)).square().sum(), x)[0])


def test_upsample_phase_weights_made_once_per_state_of_the_conv():
    """Upsample keeps its phases' weight between calls, and makes it afresh after an in-place update of the conv's weight
    (an optimizer step, a merged LoRA) or a dtype change; the bias, added as the phases are interleaved, is read each call;
    weights converted under inference mode (which keeps no version counters) work too."""
    torch.manual_seed(0)
    up = Upsample(8).double()
    x = torch.randn(1, 8, 5, 7, dtype=torch.float64)

    def expected():
        return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    with torch.no_grad():
        out = up(x)
        weight = up._phases[2]
        assert torch.equal(up(x), out) and up._phases[2] is weight  # reused
        up.conv.weight.mul_(-2)
        assert (up(x) - expected()).abs().max() <= 1e-12 and up._phases[2] is not weight
        up.conv.bias.add_(1)
        assert (up(x) - expected()).abs().max() <= 1e-12
        up.float()
        assert up(x.float()).dtype == torch.float32 and up._phases[2].dtype == torch.float32
    with torch.inference_mode():
        up.to(memory_format=torch.channels_last)  # the autoencoder's first decode on a GPU does this, in inference mode
        x = x.float().to(memory_format=torch.channels_last)
        assert rel_err(up(x), expected()) <= 1e-6
        weight = up._phases[2]
        up(x)
        assert up._phases[2] is weight
