"""A bad checkpoint of any family gives a CheckpointError that names the problem.

Each family's loader gets a file that lacks a key, has an extra one, has one of the wrong shape, or
is cut short, or a config.json it refuses; the error must name the key (with both shapes) or the file.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from zflux.common.vae import AutoencoderConfig, Autoencoder, load_autoencoder
from zflux.common.weights import CheckpointError
from zflux.flux.convert import load_transformer as load_flux
from zflux.flux.flux2.convert import load_transformer as load_flux2
from zflux.flux.flux2.model import Flux2, Flux2Config
from zflux.flux.model import Flux, FluxConfig
from util import randomize_
from zflux.zimg.convert import load_transformer as load_zimage
from zflux.zimg.model import ZImageConfig, ZImageTransformer

ZIMAGE = ZImageConfig(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                      axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
FLUX = FluxConfig(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=1,
                  joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True)
FLUX2 = Flux2Config(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
VAE = AutoencoderConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)

FAMILIES = {  # name: (model factory, loader, a key to drop, a key to mis-shape)
    "zimage": (lambda: ZImageTransformer(ZIMAGE), lambda p: load_zimage(p, dtype=torch.float32, cfg=ZIMAGE),
               "layers.1.attention.qkv.weight", "x_embedder.weight"),
    "flux": (lambda: Flux(FLUX), lambda p: load_flux(p, dtype=torch.float32, cfg=FLUX),
             "single_blocks.1.linear2.bias", "img_in.weight"),
    "flux2": (lambda: Flux2(FLUX2), lambda p: load_flux2(p, dtype=torch.float32, cfg=FLUX2),
              "double_blocks.0.txt_attn.norm.key_norm.scale", "single_blocks.1.linear1.weight"),
    "vae": (lambda: Autoencoder(VAE), lambda p: load_autoencoder(p, dtype=torch.float32, cfg=VAE),
            "decoder.up.1.block.0.nin_shortcut.weight", "encoder.conv_out.weight"),
}


BAD_CONFIGS = {  # name: (loader without a cfg, a config.json it refuses, the reason it gives)
    "zimage": (load_zimage, {"siglip_feat_dim": 1152}, "Z-Image Omni config"),
    "flux": (load_flux, {"patch_size": 2}, "patch_size must be 1"),
    "flux2": (load_flux2, {"axes_dims_rope": [16, 16, 16, 16], "attention_head_dim": 128}, "must be even and sum to the head dim 128"),
    "vae": (load_autoencoder, {"_class_name": "FluxTransformer2DModel"}, "config is for FluxTransformer2DModel"),
}


def load_error(family: str, tmp_path, edit) -> str:
    """Save the family's tiny random state dict after `edit(sd)`, load it, return the error text."""
    make, load, *_ = FAMILIES[family]
    sd = {k: v.clone() for k, v in randomize_(make()).state_dict().items()}
    edit(sd)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "bad.safetensors")
    return str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_key_is_named(family, tmp_path):
    key = FAMILIES[family][2]
    assert f"missing keys (1): {key}" in load_error(family, tmp_path, lambda sd: sd.pop(key))


@pytest.mark.parametrize("family", FAMILIES)
def test_unexpected_key_is_named(family, tmp_path):
    assert "unexpected keys (1): bogus.weight" in load_error(family, tmp_path, lambda sd: sd.update({"bogus.weight": torch.zeros(3)}))


@pytest.mark.parametrize("family", FAMILIES)
def test_misshaped_key_is_named(family, tmp_path):
    key = FAMILIES[family][3]
    shape = tuple(FAMILIES[family][0]().state_dict()[key].shape)
    wrong = (shape[0] + 1, *shape[1:])
    message = load_error(family, tmp_path, lambda sd: sd.update({key: torch.zeros(wrong)}))
    assert f"{key}: checkpoint {wrong}, model {shape}" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_config_is_named_before_weights_are_read(family, tmp_path):
    """A refused or unreadable config.json is a CheckpointError naming it, raised before the (here absent) weights are read."""
    load, config, reason = BAD_CONFIGS[family]
    named = re.escape(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{named}: .*{reason}"):
        load(tmp_path, dtype=torch.float32)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=f"{named}: Expecting"):
        load(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_and_missing_files_are_named(family, tmp_path):
    make, load, *_ = FAMILIES[family]
    path = tmp_path / "cut.safetensors"
    save_file(make().state_dict(), path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="cannot read .*cut.safetensors"):
        load(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path / "nope.safetensors")
