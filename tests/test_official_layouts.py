"""Every official checkpoint layout, checked against a converter that is not ours.

A layout test that runs our own converter on both sides cannot see a mistake made the same way in
the converter and the model (the fused qkv stored as (k, q, v) in both, say). So each layout zflux
reads has one test that takes a state dict in our (official) layout, converts it with diffusers'
own converter, loads the result strictly into diffusers' own model, and compares the outputs (or,
where the converter's output can be compared key by key, the tensors). INDEPENDENT_CHECKS names
that test for every layout; a family that adds a layout (zflux convert's LAYOUTS: FLUX.2, ...) or a
format (ControlNet, Omni, LoRA files) adds its test and its line there.

Tolerance: fp32 on the CPU, relative error <= 1e-5 (summation order only, as in test_zimg_model.py).
"""

import ast
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

from zflux.cli import LAYOUTS
from zflux.common.weights import COMFY_PREFIX
from util import randomize_, rel_err
from zflux.zimg.model import ZImageConfig, ZImageTransformer

TESTS = Path(__file__).resolve().parent
# layout (a key of zflux.cli.LAYOUTS, or a format's name) -> the test that checks it against diffusers' converter
INDEPENDENT_CHECKS = {
    "z-image": "test_official_layouts.py::test_zimage_layout_through_diffusers_converter",
    "flux.1": "test_flux_model.py::test_our_layout_through_diffusers_single_file_converter",
    "flux.2": "test_flux2_model.py::test_our_layout_through_diffusers_single_file_converter",
    "autoencoder": "test_vae.py::test_our_layout_through_diffusers_single_file_converter",
    "z-image-controlnet": "test_zimg_controlnet.py::test_layout_matches_diffusers_converter",
}

ZIMAGE = ZImageConfig(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                      axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))


def test_every_layout_has_an_independent_check():
    """Each layout `zflux convert` knows names a test here, and that test exists."""
    assert set(LAYOUTS) <= set(INDEPENDENT_CHECKS), f"layouts without an independent check: {set(LAYOUTS) - set(INDEPENDENT_CHECKS)}"
    for check in INDEPENDENT_CHECKS.values():
        file, name = check.split("::")
        defined = {node.name for node in ast.walk(ast.parse((TESTS / file).read_text())) if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{check} does not exist"


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
@torch.no_grad()
def test_zimage_layout_through_diffusers_converter(prefix):
    """Our official (or ComfyUI-prefixed) Z-Image state dict, converted by diffusers' single-file converter, runs in
    diffusers' ZImageTransformer2DModel exactly as in ours: a batch of two captions of unequal length, a non-square latent."""
    ours = randomize_(ZImageTransformer(ZIMAGE)).eval()
    official = {prefix + k: v.clone() for k, v in ours.state_dict().items()}
    ref = ZImageTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in vars(ZIMAGE).items()})
    ref.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(official), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 10, generator=g)  # (B, C, H, W)
    t = torch.rand(2, generator=g)
    cap = torch.randn(2, 40, 32, generator=g)  # (B, L, cap_feat_dim)
    mask = torch.arange(40)[None] < torch.tensor([7, 40])[:, None]  # (B, L)
    expected = ref.eval()([xi[:, None] for xi in x], t, [c[m] for c, m in zip(cap, mask)], return_dict=False)[0]
    assert rel_err(ours(x, t, cap, mask), torch.stack(expected)[:, :, 0]) <= 1e-5
