"""Z-Image transformer: parity with diffusers' ZImageTransformer2DModel, layout, loading errors.

Tolerance: fp32 on the CPU, relative error <= 1e-5. Both sides do the same math in the same
precision; what differs is summation order (fused QKV matmul, SDPA vs. diffusers' dispatch,
real-valued vs. complex RoPE), which leaves errors around 1e-7 to 1e-6.
"""

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from zflux.common.weights import COMFY_PREFIX
from util import randomize_, rel_err
from zflux.zimg.convert import from_diffusers, to_diffusers
from zflux.zimg.model import ZImageConfig, ZImageTransformer

TINY = dict(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
            axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
WIDER = dict(dim=96, n_heads=3, n_kv_heads=3, n_layers=3, n_refiner_layers=2, cap_feat_dim=48,
             axes_dims=(16, 8, 8), axes_lens=(512, 32, 32))


def make_pair(cfg_kwargs: dict, seed: int = 0):
    """A random diffusers model and ours holding the same weights (fp32)."""
    cfg = ZImageConfig(**cfg_kwargs)
    ref = randomize_(ZImageTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg_kwargs.items()}), seed)
    ours = ZImageTransformer(cfg)
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    return ref.eval(), ours.eval()


CASES = [  # (config, batch caption lengths, latent H, W)
    (TINY, [20], 8, 8),  # caption length not a multiple of 32
    (TINY, [7, 40], 6, 10),  # batch of 2, unequal captions, non-square latent
    (WIDER, [32, 32], 16, 12),  # exact multiples, no padding anywhere
    (WIDER, [33, 5], 4, 14),
]


@pytest.mark.parametrize("cfg_kwargs, cap_lens, H, W", CASES)
@torch.no_grad()
def test_parity_with_diffusers(cfg_kwargs, cap_lens, H, W):
    ref, ours = make_pair(cfg_kwargs)
    B, L, C = len(cap_lens), max(cap_lens), cfg_kwargs["cap_feat_dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, H, W, generator=g)
    t = torch.rand(B, generator=g)
    cap = torch.randn(B, L, C, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(cap_lens)[:, None]  # (B, L)

    expected = torch.stack(ref([xi[:, None] for xi in x], t, [c[m] for c, m in zip(cap, mask)], return_dict=False)[0])[:, :, 0]
    got = ours(x, t, cap, mask)
    assert got.shape == x.shape
    assert rel_err(got, expected) <= 1e-5


@torch.no_grad()
def test_mask_need_not_be_a_prefix():
    """Real tokens are taken in order wherever the mask puts them (left padding works too)."""
    _, ours = make_pair(TINY)
    g = torch.Generator().manual_seed(2)
    x, t, cap = torch.randn(1, 16, 4, 4, generator=g), torch.rand(1, generator=g), torch.randn(1, 10, 32, generator=g)
    left = torch.arange(10)[None] >= 4
    right = torch.arange(10)[None] < 6
    assert torch.equal(ours(x, t, cap, left), ours(x, t, cap[:, 4:], None))
    assert torch.equal(ours(x, t, torch.roll(cap, -4, dims=1), right), ours(x, t, cap[:, 4:], None))


@torch.no_grad()
def test_time_is_scaled_in_fp32():
    """A bf16 t embeds as its exact value times 1000 (diffusers would round 0.400390625 * 1000 to 400 in bf16)."""
    _, ours = make_pair(TINY)
    g = torch.Generator().manual_seed(3)
    x, cap = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    t = torch.tensor([0.4], dtype=torch.bfloat16)
    assert torch.equal(ours(x, t, cap), ours(x, t.float(), cap))
    assert not torch.equal(ours(x, t, cap), ours(x, (t * 1000).float() / 1000, cap))


def test_round_trip_is_exact():
    ref, ours = make_pair(TINY)
    sd = ours.state_dict()
    back = from_diffusers(to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    d = to_diffusers(sd)
    assert d.keys() == ref.state_dict().keys() and all(torch.equal(d[k], ref.state_dict()[k]) for k in d)


def test_comfy_prefix_and_unused_norm_final():
    _, ours = make_pair(TINY)
    sd = ours.state_dict()
    comfy = {COMFY_PREFIX + k: v for k, v in sd.items()} | {COMFY_PREFIX + "norm_final.weight": torch.ones(64)}
    assert from_diffusers(comfy).keys() == sd.keys()


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(1, 16, 7, 8)), "not a multiple of the patch size 2"),
    (dict(x=torch.zeros(1, 4, 8, 8)), "must be latents"),
    (dict(cap=torch.zeros(1, 5, 31)), "cap_feats must be"),
    (dict(mask=torch.zeros(1, 5, dtype=torch.bool)), "at least one token"),
    (dict(mask=torch.ones(1, 5)), "cap_mask must be bool"),
    (dict(t=torch.zeros(2)), "t must have shape"),
    (dict(x=torch.zeros(1, 16, 8, 130)), "out of range"),
])
def test_bad_inputs_are_named(bad, message):
    _, ours = make_pair(TINY)
    args = dict(x=torch.zeros(1, 16, 8, 8), t=torch.zeros(1), cap=torch.zeros(1, 5, 32), mask=None) | bad
    with pytest.raises(ValueError, match=message):
        ours(args["x"], args["t"], args["cap"], args["mask"])
