"""FLUX.2 transformer: parity with diffusers' Flux2Transformer2DModel (plain, reference tokens, KV cache),
the full-size layouts against diffusers' single-file converter, and named input errors.

Tolerance: fp32 on the CPU, relative error <= 1e-5. Both sides do the same math in the same
precision; what differs is summation order (fused QKV matmuls, RoPE on pairs, where the reference
keys sit in the KV-cache attention), which leaves errors around 1e-7.
"""

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from zflux.common.weights import param_count
from zflux.flux.flux2.convert import from_diffusers, to_diffusers
from zflux.flux.flux2.model import PRESETS, Flux2, Flux2Config, RefKV
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)
from util import randomize_, rel_err, shapes

DEV = Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
KLEIN = Flux2Config(in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
                    joint_attention_dim=20, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)


def diffusers_kwargs(cfg: Flux2Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def make_pair(cfg: Flux2Config, seed: int = 0):
    """A random diffusers model and ours holding the same weights (fp32)."""
    ref = randomize_(Flux2Transformer2DModel(**diffusers_kwargs(cfg)), seed).eval()
    ours = Flux2(cfg)
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    return ref, ours.eval()


def grid_ids(B: int, h: int, w: int, t: int = 0) -> torch.Tensor:
    """(B, h*w, 4) positions (t, row, col, 0), as diffusers' _prepare_latent_ids / _prepare_image_ids lay them out."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(1, h * w, 4)
    return ids.repeat(B, 1, 1)


def text_ids(B: int, L: int) -> torch.Tensor:
    ids = torch.zeros(B, L, 4, dtype=torch.long)
    ids[..., 3] = torch.arange(L)
    return ids


def make_inputs(cfg: Flux2Config, B: int, h: int, w: int, L: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(B, h * w, cfg.in_channels, generator=g), img_ids=grid_ids(B, h, w),
                txt=torch.randn(B, L, cfg.joint_attention_dim, generator=g), txt_ids=text_ids(B, L),
                timesteps=torch.rand(B, generator=g), guidance=torch.tensor([4.0, 2.5][:B]) if cfg.guidance_embeds else None)


def with_refs(inputs: dict, sizes: list[tuple[int, int]], seed: int = 2) -> dict:
    """Reference tokens after the target's, reference j at t = 10 + 10 j, each on its own grid."""
    g = torch.Generator().manual_seed(seed)
    B, _, C = inputs["img"].shape
    refs = [torch.randn(B, h * w, C, generator=g) for h, w in sizes]
    ids = [grid_ids(B, h, w, t=10 + 10 * j) for j, (h, w) in enumerate(sizes)]
    return inputs | dict(img=torch.cat([inputs["img"], *refs], dim=1), img_ids=torch.cat([inputs["img_ids"], *ids], dim=1))


def run_diffusers(ref: Flux2Transformer2DModel, inputs: dict, **kv) -> torch.Tensor | tuple:
    """diffusers takes one (S, 4) set of ids for the whole batch."""
    out = ref(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], timestep=inputs["timesteps"],
              img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"], return_dict=False, **kv)
    return out if kv.get("kv_cache_mode") == "extract" else out[0]


CASES = [  # (config, batch, token grid h, w, text length, reference grids)
    (DEV, 1, 4, 4, 7, []),
    (DEV, 2, 3, 5, 5, []),  # batch of 2, non-square
    (DEV, 2, 2, 3, 6, [(3, 2), (2, 2)]),  # two reference images
    (KLEIN, 1, 4, 2, 9, []),  # no guidance embedding
    (KLEIN, 2, 2, 2, 4, [(2, 3)]),
]


@pytest.mark.parametrize("cfg, B, h, w, L, refs", CASES)
@torch.no_grad()
def test_parity_with_diffusers(cfg, B, h, w, L, refs):
    ref, ours = make_pair(cfg)
    inputs = with_refs(make_inputs(cfg, B, h, w, L), refs)
    got = ours(**inputs)
    assert got.shape == (B, h * w + sum(a * b for a, b in refs), cfg.out_channels)
    assert rel_err(got, run_diffusers(ref, inputs)) <= 1e-5


@torch.no_grad()
def test_per_sample_ids():
    """Ids that differ between samples: each row as diffusers computes it alone."""
    ref, ours = make_pair(DEV)
    inputs = make_inputs(DEV, 2, 3, 3, 5)
    inputs["img_ids"][1, :, 1:] += 2
    got = ours(**inputs)
    for b in range(2):
        assert rel_err(got[b], run_diffusers(ref, {k: v[b : b + 1] for k, v in inputs.items()})[0]) <= 1e-5


@pytest.mark.parametrize("cfg, B", [(KLEIN, 1), (DEV, 2)])
@torch.no_grad()
def test_kv_cache_extract_then_cached_steps(cfg, B):
    """klein KV: a first step over [references + target] fills the cache, later steps reuse it without the references."""
    ref, ours = make_pair(cfg)
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    h, w, refs = 3, 2, [(2, 3), (2, 2)]
    step0 = make_inputs(cfg, B, h, w, 6, seed=1)
    ref_tokens = with_refs(step0, refs)["img"][:, h * w :]  # (B, R, C)
    ref_ids = with_refs(step0, refs)["img_ids"][:, h * w :]  # (B, R, 4)
    R = ref_tokens.shape[1]

    # diffusers lays the KV step out as [references; target]
    extract = step0 | dict(img=torch.cat([ref_tokens, step0["img"]], dim=1), img_ids=torch.cat([ref_ids, step0["img_ids"]], dim=1))
    expected0, cache = run_diffusers(ref, extract, kv_cache_mode="extract", num_ref_tokens=R)
    got0, ref_kv = ours.extract_ref_kv(**step0, ref=ref_tokens, ref_ids=ref_ids)
    assert got0.shape == (B, h * w, cfg.out_channels)
    assert rel_err(got0, expected0) <= 1e-5
    assert (len(ref_kv.double), len(ref_kv.single)) == (cfg.num_layers, cfg.num_single_layers)
    k, v = ref_kv.single[0]
    assert k.shape == v.shape == (B, cfg.num_attention_heads, R, cfg.attention_head_dim)
    assert rel_err(k.transpose(1, 2), cache.get_single(0).k_ref) <= 1e-5  # diffusers keeps (B, R, H, D)

    for seed in (3, 4):  # later steps: new latents and times, the same text and cache
        step = make_inputs(cfg, B, h, w, 6, seed=seed) | dict(txt=step0["txt"])
        expected = run_diffusers(ref, step, kv_cache=cache, kv_cache_mode="cached")
        assert rel_err(ours(**step, ref_kv=ref_kv), expected) <= 1e-5


@torch.no_grad()
def test_kv_references_differ_from_plain_references():
    """The KV rule is not the plain one: the references' own timestep and attention change the target's velocity."""
    _, ours = make_pair(KLEIN)
    inputs = make_inputs(KLEIN, 1, 2, 2, 4)
    plain = with_refs(inputs, [(2, 2)])
    got, _ = ours.extract_ref_kv(**inputs, ref=plain["img"][:, 4:], ref_ids=plain["img_ids"][:, 4:])
    assert rel_err(got, ours(**plain)[:, :4]) > 1e-4  # far above the 1e-7 rounding noise


def test_ref_kv_of_another_model_is_named():
    _, ours = make_pair(KLEIN)
    with pytest.raises(ValueError, match="ref_kv holds 0 \\+ 0 blocks' K/V, this model has 1 \\+ 3"):
        ours(**make_inputs(KLEIN, 1, 2, 2, 3), ref_kv=RefKV())


@torch.no_grad()
def test_our_layout_through_diffusers_single_file_converter():
    """Our state dict, converted by diffusers' own BFL converter, loads strictly into diffusers and agrees.

    This checks the BFL layout independently of flux2/convert.py."""
    ours = randomize_(Flux2(DEV)).eval()
    ref = Flux2Transformer2DModel(**diffusers_kwargs(DEV)).eval()
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(ours.state_dict())), strict=True)
    inputs = with_refs(make_inputs(DEV, 2, 2, 3, 5), [(2, 2)])
    assert rel_err(ours(**inputs), run_diffusers(ref, inputs)) <= 1e-5


PARAMS = {"flux2-dev": 32_223_281_152, "flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_layout_matches_diffusers(name):
    """At the real size (meta device): diffusers' converter and ours give diffusers' keys and shapes; counts as specified."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = Flux2(cfg).state_dict()
        ref = Flux2Transformer2DModel(**diffusers_kwargs(cfg)).state_dict()
    assert shapes(convert_flux2_transformer_checkpoint_to_diffusers(dict(ours))) == shapes(ref)
    assert shapes(to_diffusers(ours)) == shapes(ref)
    n = param_count(lambda: Flux2(cfg))
    assert n == sum(v.numel() for v in ref.values()) == PARAMS[name]


def test_config_from_diffusers_and_presets():
    with torch.device("meta"):
        dev = Flux2Transformer2DModel()
    assert Flux2Config.from_diffusers(dict(dev.config)) == PRESETS["flux2-dev"]
    klein = {"_class_name": "Flux2Transformer2DModel", "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
             "joint_attention_dim": 7680, "guidance_embeds": False, "axes_dims_rope": [32, 32, 32, 32]}
    assert Flux2Config.from_diffusers(klein) == PRESETS["flux2-klein-4b"]
    assert PRESETS["flux2-klein-9b"].hidden_size == 4096 and PRESETS["flux2-dev"].mlp_hidden == 18432
    with pytest.raises(ValueError, match="must be even and sum to the head dim 16"):
        Flux2Config(attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 4, 2))
    with pytest.raises(ValueError, match="patch_size must be 1"):
        Flux2Config(patch_size=2)


@pytest.mark.parametrize("bad, message", [
    (dict(img=torch.zeros(1, 4, 12)), "img must be packed latent tokens"),
    (dict(txt=torch.zeros(1, 3, 23)), "txt must have shape \\(1, 3, 24\\)"),
    (dict(txt=torch.zeros(2, 3, 24)), "txt must have shape"),
    (dict(txt=torch.zeros(24)), "txt must be text features \\(B, L, 24\\)"),
    (dict(img_ids=torch.zeros(1, 4, 3)), "img_ids must have shape"),
    (dict(txt_ids=torch.zeros(1, 2, 4)), "txt_ids must have shape"),
    (dict(timesteps=torch.zeros(2)), "timesteps must have shape"),
    (dict(guidance=None), "pass guidance"),
    (dict(guidance=torch.zeros(1, 1)), "guidance must have shape"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(img=torch.zeros(1, 4, 16), img_ids=torch.zeros(1, 4, 4), txt=torch.zeros(1, 3, 24), txt_ids=torch.zeros(1, 3, 4),
                timesteps=torch.zeros(1), guidance=torch.ones(1)) | bad
    with pytest.raises(ValueError, match=message):
        Flux2(DEV)(**args)


def test_guidance_for_a_klein_model_is_named():
    with pytest.raises(ValueError, match="no guidance embedding \\(FLUX.2 klein\\)"):
        Flux2(KLEIN)(**make_inputs(KLEIN, 1, 2, 2, 3) | dict(guidance=torch.ones(1)))
