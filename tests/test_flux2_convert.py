"""FLUX.2 checkpoint layouts and loading: BFL <-> diffusers round trips, single files, ComfyUI prefixes,
sharded diffusers folders, the config read off a file, what `identify` names, and named errors."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

from zflux.common.identify import _classify, identify
from zflux.common.weights import COMFY_PREFIX, CheckpointError, read_state_dict
from zflux.flux.flux2.convert import config_from_state_dict, from_diffusers, load_transformer, to_diffusers
from zflux.flux.flux2.model import PRESETS, Flux2, Flux2Config
from test_flux2_model import DEV, diffusers_kwargs
from util import randomize_, shapes, write_sharded_folder

# A config that config_from_state_dict can read off a file: 4 RoPE axes of 4 channels fill a head of 16.
SMALL = Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))


@pytest.fixture
def small_sd():
    return {k: v.clone() for k, v in randomize_(Flux2(SMALL)).state_dict().items()}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trips_are_exact():
    ref = randomize_(Flux2Transformer2DModel(**diffusers_kwargs(DEV)))
    theirs = ref.state_dict()
    ours = from_diffusers(theirs)
    assert equal(to_diffusers(ours), theirs)
    assert equal(from_diffusers(to_diffusers(ours)), ours)
    assert equal(from_diffusers({COMFY_PREFIX + k: v for k, v in ours.items()}), ours)
    assert equal(to_diffusers({COMFY_PREFIX + k: v for k, v in ours.items()}), theirs)
    assert shapes(ours) == shapes(Flux2(DEV).state_dict())


def test_only_the_final_modulation_is_swapped(small_sd):
    """BFL's final adaLN projection yields (shift, scale), diffusers' norm_out (scale, shift); the shared modulation keeps its order."""
    shift, scale = small_sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
    d = to_diffusers(small_sd)
    assert torch.equal(d["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert torch.equal(d["single_stream_modulation.linear.weight"], small_sd["single_stream_modulation.lin.weight"])
    assert torch.equal(d["single_transformer_blocks.1.attn.to_qkv_mlp_proj.weight"], small_sd["single_blocks.1.linear1.weight"])
    q, k, v = small_sd["double_blocks.1.txt_attn.qkv.weight"].chunk(3)
    assert torch.equal(d["transformer_blocks.1.attn.add_k_proj.weight"], k)
    assert torch.equal(d["transformer_blocks.1.attn.norm_added_q.weight"], small_sd["double_blocks.1.txt_attn.norm.query_norm.scale"])


def test_loads_bfl_comfy_and_sharded_diffusers_folder(tmp_path, small_sd):
    save_file(small_sd, tmp_path / "flux-2-klein.safetensors")
    save_file({COMFY_PREFIX + k: v for k, v in small_sd.items()}, tmp_path / "comfy.safetensors")
    config = {"_class_name": "Flux2Transformer2DModel", **diffusers_kwargs(SMALL)}
    folder = write_sharded_folder(tmp_path / "transformer", to_diffusers(small_sd), config)
    for path in (tmp_path / "flux-2-klein.safetensors", tmp_path / "comfy.safetensors", folder):
        model = load_transformer(path, dtype=torch.float32)
        assert model.cfg == SMALL and equal(model.state_dict(), small_sd)
    assert load_transformer(folder).dtype == torch.bfloat16


def test_config_read_off_a_klein_file(tmp_path, small_sd):
    klein = {k: v for k, v in small_sd.items() if not k.startswith("guidance_in.")}
    save_file(klein, tmp_path / "klein.safetensors")
    model = load_transformer(tmp_path / "klein.safetensors", dtype=torch.float32)
    assert model.cfg == Flux2Config(**{**SMALL.__dict__, "guidance_embeds": False}) and equal(model.state_dict(), klein)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_config_and_identity_from_shapes(name):
    """At the real size (meta device): the config read off the keys is the preset, and identify names the variant."""
    with torch.device("meta"):
        ours = Flux2(PRESETS[name]).state_dict()
    assert config_from_state_dict(ours) == PRESETS[name]
    classify = lambda sd: _classify(shapes(sd), lambda key: pytest.fail(f"read {key}"))  # noqa: E731 (names from shapes alone)
    assert classify(ours)[:2] == ("flux.2", name)
    assert classify(to_diffusers(ours))[1:] == classify(ours)[1:3] + ("diffusers",)


def test_identify_a_small_file(tmp_path, small_sd):
    save_file({COMFY_PREFIX + k: v for k, v in small_sd.items()}, tmp_path / "comfy.safetensors")
    info = identify(tmp_path / "comfy.safetensors")
    assert (info.family, info.variant, info.layout) == ("flux.2", None, "ComfyUI")
    assert "width 32" in info.description


def test_klein_checkpoint_with_dev_config_is_named(tmp_path, small_sd):
    save_file({k: v for k, v in small_sd.items() if not k.startswith("guidance_in.")}, tmp_path / "klein.safetensors")
    with pytest.raises(CheckpointError, match="missing keys \\(2\\): guidance_in.in_layer.weight, guidance_in.out_layer.weight"):
        load_transformer(tmp_path / "klein.safetensors", cfg=SMALL)


def test_incomplete_diffusers_qkv_is_named(tmp_path, small_sd):
    d = to_diffusers(small_sd)
    del d["transformer_blocks.1.attn.to_v.weight"]
    save_file(d, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): transformer_blocks.1.attn.to_v.weight"):  # as the file names it
        load_transformer(tmp_path / "bad.safetensors", cfg=SMALL)
    with pytest.raises(CheckpointError, match="double_blocks.1.img_attn.qkv.weight: the diffusers checkpoint holds only 2 of its 3"):
        from_diffusers(d)


def test_config_cannot_be_read_off_foreign_file(tmp_path):
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="cannot infer the FLUX.2 config: the checkpoint has no img_in.weight"):
        load_transformer(tmp_path / "other.safetensors")


def test_zflux_convert_round_trip(tmp_path, small_sd, capsys):
    """zflux convert: a diffusers folder -> BFL's single file -> diffusers again, every tensor exact."""
    from zflux.cli import main

    folder = write_sharded_folder(tmp_path / "transformer", to_diffusers(small_sd), diffusers_kwargs(SMALL))
    main(["convert", str(folder), str(tmp_path / "bfl.safetensors")])
    assert "original layout (read as diffusers)" in capsys.readouterr().out
    assert equal(read_state_dict(tmp_path / "bfl.safetensors"), small_sd)
    main(["convert", str(tmp_path / "bfl.safetensors"), str(tmp_path / "back.safetensors"), "--to", "diffusers"])
    assert equal(read_state_dict(tmp_path / "back.safetensors"), read_state_dict(folder))
