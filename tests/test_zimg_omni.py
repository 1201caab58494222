"""Z-Image Omni transformer: parity with diffusers' ZImageTransformer2DModel in Omni mode, its position rules, loading.

Tolerance: fp32 on the CPU, relative error <= 1e-5, as test_zimg_model.py (the same math in a
different summation order).
"""

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import save_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from zflux.cli import main
from zflux.common.identify import identify
from zflux.common.weights import CheckpointError
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread)
from util import randomize_, rel_err
from zflux.zimg.convert import from_diffusers, load_omni_transformer, load_transformer, to_diffusers
from zflux.zimg.model import ZImageConfig
from zflux.zimg.omni import ZImageOmniTransformer, caption_ids, siglip_tokens

TINY = dict(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=2, cap_feat_dim=32, siglip_feat_dim=24,
            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
TOL = 1e-5


def config(**overrides) -> ZImageConfig:
    return ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (TINY | overrides).items()})


@pytest.fixture(scope="module")
def pair():
    """diffusers' Omni transformer and ours with the same random weights."""
    ref = randomize_(ZImageTransformer2DModel(**TINY), seed=0).eval()
    ours = ZImageOmniTransformer(config())
    ours.load_state_dict(from_diffusers(ref.state_dict()))
    return ref, ours.eval()


CASES = {  # name: (caption segment lengths per sample, condition latent sizes, SigLIP map sizes or None, target size)
    "text to image": ([[20]], [], None, (8, 8)),
    "text to image, CFG batch": ([[7], [40]], [], None, (6, 10)),
    "one condition": ([[3, 7, 4], [5, 40, 2]], [(6, 8)], [(3, 5)], (8, 6)),
    "two conditions": ([[3, 33, 7, 4], [9, 2, 50, 1]], [(6, 8), (10, 4)], [(4, 4), (2, 6)], (8, 6)),
    "one condition, no SigLIP": ([[12, 30, 5]], [(4, 4)], None, (4, 4)),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_parity_with_diffusers(pair, case):
    ref, ours = pair
    cap_lens, cond_sizes, sig_sizes, (H, W) = CASES[case]
    B = len(cap_lens)
    g = torch.Generator().manual_seed(1)
    captions = [[torch.randn(n, TINY["cap_feat_dim"], generator=g) for n in lens] for lens in cap_lens]
    images = [torch.randn(16, h, w, generator=g) for h, w in cond_sizes]
    siglip = None if sig_sizes is None else [torch.randn(h, w, TINY["siglip_feat_dim"], generator=g) for h, w in sig_sizes]
    x, t = torch.randn(B, 16, H, W, generator=g), torch.rand(B, generator=g)

    expected = ref([[image[:, None] for image in images] + [target[:, None]] for target in x], t, captions,
                   siglip_feats=[None if siglip is None else [*siglip, None]] * B,
                   image_noise_mask=[[0] * len(images) + [1]] * B, return_dict=False)[0]
    got = ours(x, t, captions, images, siglip)
    assert got.shape == x.shape
    assert rel_err(got, torch.stack(expected)[:, :, 0]) <= TOL


def test_caption_position_quirk():
    """Segments of 3, 7, 4 tokens, as diffusers 0.42.1 places them (patchify_and_embed_omni, checked by hand): token rows
    0-31 read 1..32, rows 32-60 segment 1's 29 zero rows, rows 61-92 segment 2's 6..37, rows 93-95 its first zero rows;
    segment 3's own positions (15..46) are never read. (zimage-extras.md's example, 27 zero rows, is off by two.)"""
    ids, ends = caption_ids([3, 7, 4])
    first = ids[:, 0]
    assert ids.shape == (96, 3) and not ids[:, 1:].any()
    assert torch.equal(first[:32], torch.arange(1, 33)) and not first[32:61].any()
    assert torch.equal(first[61:93], torch.arange(6, 38)) and not first[93:].any()
    assert ends == [4, 13, 19]


def test_siglip_tokens_are_cut_channel_major():
    features = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (h, w, C)
    assert torch.equal(siglip_tokens(features), features.permute(2, 0, 1).reshape(6, 4))
    assert not torch.equal(siglip_tokens(features), features.reshape(6, 4))


def test_zflux_info_names_omni_and_siglip(pair, tmp_path, capsys):
    ref, _ = pair
    ref.save_pretrained(tmp_path / "transformer")
    main(["info", str(tmp_path / "transformer")])
    assert "Z-Image Omni (text to image and editing with condition images; SigLIP2 width 24)" in capsys.readouterr().out
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_patches=16, patch_size=4)).save_pretrained(tmp_path / "siglip")
    assert (identify(tmp_path / "siglip").family, identify(tmp_path / "siglip").layout) == ("siglip2", "transformers")


def test_loading_and_mode_errors(pair, tmp_path):
    ref, ours = pair
    file = tmp_path / "omni" / "omni.safetensors"
    file.parent.mkdir()
    save_file(from_diffusers(ref.state_dict()), file)
    ref.save_pretrained(tmp_path / "transformer")
    info = identify(file)
    assert (info.variant, info.family) == ("z-image-omni", "z-image") and "SigLIP2 width 24" in info.description

    folder = load_omni_transformer(tmp_path / "transformer", dtype=torch.float32)
    assert folder.cfg == config() and all(torch.equal(v, ours.state_dict()[k]) for k, v in folder.state_dict().items())
    with pytest.raises(CheckpointError, match="a Z-Image Omni config .*load it with load_omni_transformer"):
        load_transformer(tmp_path / "transformer")
    with pytest.raises(CheckpointError, match="holds Z-Image Omni .*: load it with load_omni_transformer"):
        load_transformer(file)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v for k, v in ours.state_dict().items() if not k.startswith("siglip_")}, plain)
    with pytest.raises(CheckpointError, match="holds a Z-Image transformer .*: load it with load_transformer"):
        load_omni_transformer(plain)
    assert to_diffusers(folder.state_dict()).keys() == ref.state_dict().keys()


@pytest.mark.parametrize("bad, message", [
    (dict(captions=[[torch.zeros(3, 32)]]), "1 condition images need at least 2 caption segments"),
    (dict(siglip=[]), "one map per condition image"),
    (dict(siglip=[torch.zeros(2, 2, 7)]), r"SigLIP maps must be \(h, w, 24\)"),
    (dict(images=[torch.zeros(16, 3, 4)]), "condition image 0 must be latents"),
    (dict(captions=[[torch.zeros(0, 32), torch.zeros(2, 32)]]), "caption segments must be"),
])
def test_bad_inputs_are_named(pair, bad, message):
    _, ours = pair
    args = dict(x=torch.zeros(1, 16, 4, 4), t=torch.zeros(1), captions=[[torch.zeros(3, 32)] * 3], images=[torch.zeros(16, 4, 4)],
                siglip=None) | bad
    with pytest.raises(ValueError, match=message):
        ours(**args)
