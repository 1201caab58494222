"""Z-Image checkpoints: the full-size layout, loading from files and folders (bad files: test_checkpoint_errors.py)."""

import json

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from zflux.common.weights import CheckpointError, param_count
from util import randomize_, shapes, write_sharded_folder
from zflux.zimg.convert import load_transformer, to_diffusers
from zflux.zimg.model import PRESETS, ZImageConfig, ZImageTransformer

TINY = ZImageConfig(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                    axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))


def test_full_turbo_layout_matches_diffusers_single_file_converter():
    """Our state dict at the real size, run through diffusers' own single-file converter, is diffusers' layout."""
    with torch.device("meta"):
        ours = ZImageTransformer(PRESETS["z-image-turbo"]).state_dict()
        ref = ZImageTransformer2DModel(axes_lens=list(PRESETS["z-image-turbo"].axes_lens)).state_dict()
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(ours))
    assert shapes(converted) == shapes(ref)
    assert shapes(to_diffusers(ours)) == shapes(ref)
    n = param_count(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    print(f"Z-Image-Turbo parameters: {n / 1e9:.3f} B")
    assert n == sum(v.numel() for v in ref.values())
    assert 6.1e9 < n < 6.2e9


@pytest.fixture
def tiny_sd():
    return {k: v.clone() for k, v in randomize_(ZImageTransformer(TINY)).state_dict().items()}


def test_loads_official_file_diffusers_folder_and_shards(tmp_path, tiny_sd):
    config = {"_class_name": "ZImageTransformer2DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.__dict__.items()}}
    save_file(tiny_sd, tmp_path / "official.safetensors")
    folder = write_sharded_folder(tmp_path / "transformer", to_diffusers(tiny_sd), config)

    a = load_transformer(tmp_path / "official.safetensors", dtype=torch.float32, cfg=TINY)
    b = load_transformer(folder, dtype=torch.float32)
    assert b.cfg == TINY
    for model in (a, b):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_sd.items())
    assert load_transformer(tmp_path / "official.safetensors", cfg=TINY).dtype == torch.bfloat16


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards that are not there: .*m-1.safetensors"):
        load_transformer(tmp_path / "m.safetensors.index.json", cfg=TINY)
