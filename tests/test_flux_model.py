"""FLUX.1 transformer: parity with diffusers' FluxTransformer2DModel, checkpoint layouts, loading, named errors.

Tolerance: fp32 on the CPU, relative error <= 1e-5. Both sides do the same math in the same
precision; what differs is summation order (fused QKV / linear1 matmuls, where the modulation is
applied, RoPE on pairs vs. on interleaved copies), which leaves errors around 1e-7.
"""


import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from zflux.common.weights import COMFY_PREFIX, CheckpointError, param_count
from zflux.flux.convert import config_from_state_dict, from_diffusers, load_transformer, to_diffusers
from zflux.flux.model import PRESETS, Flux, FluxConfig
from zflux.common.latents import pack_latents, unpack_latents
from zflux.flux.pipeline import img_ids, txt_ids
from util import randomize_, rel_err, shapes, write_sharded_folder

DEV = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SCHNELL = FluxConfig(in_channels=8, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
                     joint_attention_dim=20, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
FILL = FluxConfig(in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))


def diffusers_kwargs(cfg: FluxConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def make_pair(cfg: FluxConfig, seed: int = 0, backend: str | None = None):
    """A random diffusers model and ours holding the same weights (fp32)."""
    ref = randomize_(FluxTransformer2DModel(**diffusers_kwargs(cfg)), seed).eval()
    ours = Flux(cfg, backend)
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    return ref, ours.eval()


def make_inputs(cfg: FluxConfig, B: int, H: int, W: int, L: int, seed: int = 1) -> dict:
    """Random packed latents (from a (B, C, H, W) latent), text, pooled vector, timesteps and ids."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, cfg.in_channels // 4, H, W, generator=g)
    return dict(img=pack_latents(latents), img_ids=img_ids(B, H // 2, W // 2), txt=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
                txt_ids=txt_ids(B, L), timesteps=torch.rand(B, generator=g), y=torch.randn(B, cfg.pooled_projection_dim, generator=g),
                guidance=torch.tensor([3.5, 1.5, 7.0][:B]) if cfg.guidance_embeds else None)


def run_diffusers(ref: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    """diffusers takes one (S, 3) set of ids for the whole batch."""
    return ref(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
               timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
               guidance=inputs["guidance"], return_dict=False)[0]


CASES = [  # (config, batch, latent H, W, text length, backend)
    (DEV, 1, 8, 8, 7, None),
    (DEV, 2, 6, 10, 5, None),  # batch of 2, non-square latent
    (DEV, 2, 4, 6, 9, "reference"),
    (SCHNELL, 2, 10, 4, 3, None),  # no guidance embedding
    (FILL, 2, 4, 8, 6, None),  # the Fill tool's 384 input channels
]


@pytest.mark.parametrize("cfg, B, H, W, L, backend", CASES)
@torch.no_grad()
def test_parity_with_diffusers(cfg, B, H, W, L, backend):
    ref, ours = make_pair(cfg, backend=backend)
    inputs = make_inputs(cfg, B, H, W, L)
    expected = run_diffusers(ref, inputs)
    got = ours(**inputs)
    assert got.shape == (B, H * W // 4, cfg.out_channels)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("cfg", [DEV, SCHNELL], ids=["dev", "schnell"])
@torch.no_grad()
def test_modulations_taken_ahead_for_several_steps(cfg):
    """Every block's modulation taken for three steps at once (Flux.modulations, as the pipelines do), each step's slice
    passed in: the steps' outputs against diffusers, as when each block takes its own."""
    ref, ours = make_pair(cfg)
    inputs = make_inputs(cfg, 2, 6, 4, 5)
    times = torch.tensor([0.9, 0.5, 0.2])
    guidance = None if inputs["guidance"] is None else inputs["guidance"].repeat(3)
    ahead = ours.modulations(times.repeat_interleave(2), inputs["y"].repeat(3, 1), guidance).view(3, 2, -1)  # (steps, B, W)
    for i, t in enumerate(times):
        step = inputs | dict(timesteps=t.expand(2))
        assert rel_err(ours(**step, modulations=ahead[i]), run_diffusers(ref, step)) <= 1e-5
    with pytest.raises(ValueError, match="modulations must have shape"):
        ours(**inputs, modulations=ahead[0, :, 1:])


@torch.no_grad()
def test_kontext_style_ids_and_per_sample_ids():
    """Reference-image tokens at index 1 of axis 0 (Kontext), and ids that differ between samples."""
    ref, ours = make_pair(DEV)
    inputs = make_inputs(DEV, 2, 4, 4, 5)
    reference = img_ids(2, 2, 3)
    reference[..., 0] = 1
    inputs["img"] = torch.cat([inputs["img"], torch.randn(2, 6, DEV.in_channels)], dim=1)  # (B, 4 + 6, C)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], reference], dim=1)
    assert rel_err(ours(**inputs), run_diffusers(ref, inputs)) <= 1e-5

    inputs["img_ids"][1, :, 1:] += 3  # the second sample's image sits elsewhere on the grid
    got = ours(**inputs)
    for b in range(2):
        one = {k: v[b : b + 1] for k, v in inputs.items()}
        assert rel_err(got[b], run_diffusers(ref, one)[0]) <= 1e-5


def test_config_from_diffusers_and_presets():
    ref = FluxTransformer2DModel(**diffusers_kwargs(SCHNELL))
    assert FluxConfig.from_diffusers(dict(ref.config)) == SCHNELL
    assert FluxConfig.from_diffusers({"in_channels": 384, "out_channels": 64, "guidance_embeds": True}) == PRESETS["flux-fill"]
    assert PRESETS["flux-dev"].out_channels == 64 and PRESETS["flux-dev"].hidden_size == 3072
    with pytest.raises(ValueError, match="must be even and sum to the head dim 16"):
        FluxConfig(attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="patch_size must be 1"):
        FluxConfig(patch_size=2)


def test_round_trip_is_exact():
    ref, ours = make_pair(DEV)
    sd = ours.state_dict()
    back = from_diffusers(to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    d, expected = to_diffusers(sd), ref.state_dict()
    assert d.keys() == expected.keys() and all(torch.equal(d[k], expected[k]) for k in d)
    comfy = {COMFY_PREFIX + k: v for k, v in sd.items()}
    assert from_diffusers(comfy).keys() == sd.keys()
    assert to_diffusers(comfy).keys() == expected.keys()


def test_final_norm_halves_are_swapped():
    """BFL's final adaLN projection yields (shift, scale), diffusers' norm_out (scale, shift)."""
    _, ours = make_pair(DEV)
    w = ours.state_dict()["final_layer.adaLN_modulation.1.weight"]
    shift, scale = w.chunk(2)
    assert torch.equal(to_diffusers(ours.state_dict())["norm_out.linear.weight"], torch.cat([scale, shift]))


@torch.no_grad()
def test_our_layout_through_diffusers_single_file_converter():
    """Our state dict, converted by diffusers' own BFL converter, loads strictly into diffusers and agrees.

    This checks BFL-layout compatibility independently of flux/convert.py. The converter assumes hidden
    size 3072, so the model is 3072 wide with one block of each kind and small in/text/pooled dims.
    """
    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=24,
                     guidance_embeds=True)
    with torch.device("meta"):
        ours = Flux(cfg)
        ref = FluxTransformer2DModel(**diffusers_kwargs(cfg))
    g = torch.Generator().manual_seed(0)
    for name, p in ours.to_empty(device="cpu").named_parameters():  # uniform: 5x faster than randomize_'s normal at 0.5 B
        p.uniform_(-0.03, 0.03, generator=g).add_(1.0 if name.endswith(".scale") else 0.0)
    ref.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(ours.state_dict())), strict=True, assign=True)
    inputs = make_inputs(cfg, 1, 4, 6, 3)
    assert rel_err(ours.eval()(**inputs), run_diffusers(ref.eval(), inputs)) <= 1e-5


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "flux-fill", "flux-canny"])
def test_full_size_layout_matches_diffusers(name):
    """At the real size (meta device): diffusers' converter and ours give diffusers' keys and shapes."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = Flux(cfg).state_dict()
        ref = FluxTransformer2DModel(**diffusers_kwargs(cfg)).state_dict()
    assert shapes(convert_flux_transformer_checkpoint_to_diffusers(dict(ours))) == shapes(ref)
    assert shapes(to_diffusers(ours)) == shapes(ref)
    assert config_from_state_dict(ours) == cfg
    n = param_count(lambda: Flux(cfg))
    print(f"{name} parameters: {n / 1e9:.3f} B")
    assert n == sum(v.numel() for v in ref.values())
    assert 11.8e9 < n < 12.0e9


# A config that config_from_state_dict can read off a file: FLUX.1's head dim 128, one head.
SMALL = FluxConfig(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=1,
                   joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True)


@pytest.fixture
def small_sd():
    return {k: v.clone() for k, v in randomize_(Flux(SMALL)).state_dict().items()}


def equal_state(model: Flux, sd: dict) -> bool:
    return model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_loads_bfl_comfy_and_diffusers_folder(tmp_path, small_sd):
    save_file(small_sd, tmp_path / "bfl.safetensors")
    save_file({COMFY_PREFIX + k: v for k, v in small_sd.items()}, tmp_path / "comfy.safetensors")
    config = {"_class_name": "FluxTransformer2DModel", **diffusers_kwargs(SMALL)}
    folder = write_sharded_folder(tmp_path / "transformer", to_diffusers(small_sd), config)

    for path in (tmp_path / "bfl.safetensors", tmp_path / "comfy.safetensors", folder):
        model = load_transformer(path, dtype=torch.float32)
        assert model.cfg == SMALL and equal_state(model, small_sd)
    assert load_transformer(tmp_path / "bfl.safetensors").dtype == torch.bfloat16


def test_config_read_off_schnell_file(tmp_path, small_sd):
    schnell = {k: v for k, v in small_sd.items() if not k.startswith("guidance_in.")}
    save_file(schnell, tmp_path / "schnell.safetensors")
    model = load_transformer(tmp_path / "schnell.safetensors", dtype=torch.float32)
    assert not model.cfg.guidance_embeds and equal_state(model, schnell)


def _load_error(tmp_path, sd, cfg=SMALL) -> str:
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "bad.safetensors", dtype=torch.float32, cfg=cfg)
    return str(e.value)


def test_dev_checkpoint_with_schnell_config_is_named(tmp_path, small_sd):
    schnell = FluxConfig(**{**SMALL.__dict__, "guidance_embeds": False})
    assert "unexpected keys (4): guidance_in.in_layer.bias" in _load_error(tmp_path, small_sd, schnell)


def test_incomplete_diffusers_qkv_is_named(tmp_path, small_sd):
    d = to_diffusers(small_sd)
    del d["transformer_blocks.0.attn.add_k_proj.weight"]
    assert "missing keys (1): transformer_blocks.0.attn.add_k_proj.weight" in _load_error(tmp_path, d)  # as the file names it
    with pytest.raises(CheckpointError, match="lacks transformer_blocks.0.attn.add_k_proj.weight: double_blocks.0.txt_attn.qkv"):
        from_diffusers(d)


def test_config_cannot_be_read_off_foreign_file(tmp_path):
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="cannot infer the FLUX config: the checkpoint has no img_in.weight"):
        load_transformer(tmp_path / "other.safetensors")


@pytest.mark.parametrize("bad, message", [
    (dict(img=torch.zeros(1, 4, 12)), "img must be packed latents"),
    (dict(txt=torch.zeros(1, 3, 31)), "txt must be"),
    (dict(txt=torch.zeros(2, 3, 32)), "txt must be"),
    (dict(img_ids=torch.zeros(1, 4, 2)), "img_ids must have shape"),
    (dict(txt_ids=torch.zeros(3, 3)), "txt_ids must have shape"),
    (dict(timesteps=torch.zeros(2)), "timesteps must have shape"),
    (dict(y=torch.zeros(1, 23)), "y must have shape"),
    (dict(guidance=None), "pass guidance"),
    (dict(guidance=torch.zeros(1, 1)), "guidance must have shape"),
])
def test_bad_inputs_are_named(bad, message):
    ours = Flux(DEV)
    args = dict(img=torch.zeros(1, 4, 16), img_ids=torch.zeros(1, 4, 3), txt=torch.zeros(1, 3, 32), txt_ids=torch.zeros(1, 3, 3),
                timesteps=torch.zeros(1), y=torch.zeros(1, 24), guidance=torch.ones(1)) | bad
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_guidance_for_a_schnell_model_is_named():
    inputs = make_inputs(SCHNELL, 1, 4, 4, 3) | dict(guidance=torch.ones(1))
    with pytest.raises(ValueError, match="no guidance embedding"):
        Flux(SCHNELL)(**inputs)


def test_pack_unpack_and_ids_match_diffusers_pipeline():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    ids = img_ids(2, 3, 5)
    assert ids.shape == (2, 15, 3) and torch.equal(ids[1].float(), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert torch.equal(txt_ids(2, 4), torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="even H and W"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="tokens must be"):
        unpack_latents(packed, 6, 12)
