"""Z-Image ControlNet Union: parity with diffusers' ZImageControlNetModel + ZImageTransformer2DModel, the three
published variants told apart by their keys, the published layout, loading and fit errors.

The tiny models keep the real block counts and hint places (30 main layers, 2 refiner layers, hints at
0, 5, ..., 25 or 0, 2, ..., 28) at width 32, so the variants are recognised from their keys exactly
as the published files are. Every weight is random, the zero-initialised projections included.
Tolerance: fp32 on the CPU, relative error <= 1e-5 (the same math in a different summation order, as
in test_zimg_model.py; two chains of 30 + 15 blocks leave ~1e-6).
"""

import json

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers, infer_diffusers_model_type
from safetensors.torch import save_file

from zflux.cli import main
from zflux.common.identify import CONTROLNETS, identify
from zflux.common.weights import CheckpointError, build_on_meta, load_into, read_state_dict
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread)
from util import randomize_, rel_err, shapes
from zflux.zimg.controlnet import PRESETS, ControlNetConfig, ZImageControlNet
from zflux.zimg.convert import (controlnet_from_diffusers, controlnet_to_diffusers, from_diffusers, load_controlnet,
                                load_transformer)
from zflux.zimg.model import ZImageConfig, ZImageTransformer

BASE = dict(dim=32, n_heads=2, n_kv_heads=2, n_layers=30, n_refiner_layers=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64])
WIDTHS = dict(dim=32, n_heads=2, n_kv_heads=2, n_refiner_layers=2, control_in_dim=33)
V1, V20, V21 = PRESETS  # diffusers' model types of the three published files
DIFFUSERS_CONFIGS = {  # as the hlky/Z-Image-Turbo-Fun-Controlnet-Union* configs describe them
    V1: dict(control_layers_places=list(range(0, 26, 5)), control_refiner_layers_places=None, add_control_noise_refiner=None),
    V20: dict(control_layers_places=list(range(0, 29, 2)), control_refiner_layers_places=[0, 1],
              add_control_noise_refiner="control_layers"),
    V21: dict(control_layers_places=list(range(0, 29, 2)), control_refiner_layers_places=[0, 1],
              add_control_noise_refiner="control_noise_refiner"),
}
TOL = 1e-5


def published_file(variant: str, path, seed: int = 0) -> tuple[ZImageControlNetModel, dict]:
    """A random diffusers ControlNet of `variant` and the file it would be published as (saved at `path`).

    The 2.0 file also carries the 2.1 refiner blocks with a zero before_proj, as diffusers expects of it.
    """
    ref = randomize_(ZImageControlNetModel(**DIFFUSERS_CONFIGS[variant], **WIDTHS), seed).eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if variant == V20:
        unused = ZImageControlNetModel(**DIFFUSERS_CONFIGS[V21], **WIDTHS).state_dict()
        sd |= {k: torch.zeros_like(v) if "before_proj" in k else torch.randn_like(v)
               for k, v in unused.items() if k.startswith("control_noise_refiner.")}
    save_file(sd, path)
    return ref, sd


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """diffusers' base transformer and ours, holding the same random weights."""
    ref = randomize_(ZImageTransformer2DModel(**BASE), seed=1).eval()
    ours = ZImageTransformer(ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in BASE.items()}))
    ours.load_state_dict(from_diffusers(ref.state_dict()))
    return ref, ours.eval()


def inputs(cap_lens: list[int], H: int = 6, W: int = 10, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    B, L = len(cap_lens), max(cap_lens)
    x, control = torch.randn(B, 16, H, W, generator=g), torch.randn(B, 33, H, W, generator=g)
    t, cap = torch.rand(B, generator=g), torch.randn(B, L, BASE["cap_feat_dim"], generator=g)
    mask = torch.arange(L)[None] < torch.tensor(cap_lens)[:, None]  # (B, L)
    return x, t, cap, mask, control


def diffusers_output(base_ref, controlnet_ref, x, t, cap, mask, control, scale):
    controlnet_ref = ZImageControlNetModel.from_transformer(controlnet_ref, base_ref)
    frames = lambda batch: [b[:, None] for b in batch]  # (C, 1, H, W) each
    caps = [c[m] for c, m in zip(cap, mask)]
    hints = controlnet_ref(frames(x), t, caps, frames(control), conditioning_scale=scale)
    return torch.stack(base_ref(frames(x), t, caps, controlnet_block_samples=hints, return_dict=False)[0])[:, :, 0]


@pytest.mark.parametrize("variant", PRESETS)
@pytest.mark.parametrize("cap_lens", [[20], [7, 40]])  # one caption; a CFG-like batch of unequal captions
@torch.no_grad()
def test_parity_with_diffusers(base, tmp_path, variant, cap_lens):
    base_ref, base_ours = base
    ref, _ = published_file(variant, tmp_path / "controlnet.safetensors")
    controlnet = load_controlnet(tmp_path / "controlnet.safetensors", base_ours.cfg, dtype=torch.float32)
    x, t, cap, mask, control = inputs(cap_lens)

    expected = diffusers_output(base_ref, ref, x, t, cap, mask, control, scale=0.7)
    got = base_ours(x, t, cap, mask, control=controlnet.bind(base_ours, control, scale=0.7))
    assert rel_err(got, expected) <= TOL
    plain = base_ours(x, t, cap, mask)
    assert rel_err(got, plain) > 1e-2  # the hints matter
    assert torch.equal(base_ours(x, t, cap, mask, control=controlnet.bind(base_ours, control, scale=0.0)), plain)


@pytest.mark.parametrize("variant", PRESETS)
def test_variant_is_told_from_the_keys_as_diffusers_does(tmp_path, variant):
    path = tmp_path / "controlnet.safetensors"
    _, sd = published_file(variant, path)
    info = identify(path)
    assert (info.family, info.variant, info.layout) == ("z-image-controlnet", variant, "official")
    assert infer_diffusers_model_type(sd) == variant
    cfg, expected = ControlNetConfig.from_shapes(shapes(sd), variant), DIFFUSERS_CONFIGS[variant]
    assert cfg.control_layers_places == tuple(expected["control_layers_places"])
    assert cfg.add_control_noise_refiner == expected["add_control_noise_refiner"]
    assert cfg.refiner_hints == (variant != V1) and cfg.control_refiner_layers_places == ((0, 1) if cfg.refiner_hints else ())
    assert (cfg.dim, cfg.n_heads, cfg.control_in_dim, cfg.n_refiner_layers) == (32, 2, 33, 2)


@pytest.mark.parametrize("variant", PRESETS)
def test_layout_matches_diffusers_converter(tmp_path, variant):
    """Our layout, mapped back, is what diffusers' own single-file converter makes of the published file."""
    path = tmp_path / "controlnet.safetensors"
    ref, sd = published_file(variant, path)
    ours = load_controlnet(path, ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in BASE.items()}),
                           dtype=torch.float32)
    converted = convert_z_image_controlnet_checkpoint_to_diffusers(dict(sd), DIFFUSERS_CONFIGS[variant])
    back = controlnet_to_diffusers(ours.state_dict())
    assert back.keys() == converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], converted[k]) for k in back)
    assert controlnet_from_diffusers(back).keys() == ours.state_dict().keys()


@pytest.mark.parametrize("variant", PRESETS)
def test_full_size_shapes_match_diffusers(variant):
    ours = build_on_meta(lambda: ZImageControlNet(PRESETS[variant])).state_dict()
    with torch.device("meta"):
        ref = ZImageControlNetModel(**DIFFUSERS_CONFIGS[variant], control_in_dim=33).state_dict()
    assert shapes(controlnet_to_diffusers(ours)) == shapes(ref)


def test_loads_diffusers_folder(base, tmp_path):
    _, base_ours = base
    ref, _ = published_file(V21, tmp_path / "controlnet.safetensors")
    ref.save_pretrained(tmp_path / "controlnet")
    from_file = load_controlnet(tmp_path / "controlnet.safetensors", base_ours.cfg, dtype=torch.float32)
    from_folder = load_controlnet(tmp_path / "controlnet", base_ours.cfg, dtype=torch.float32)
    assert from_folder.cfg == from_file.cfg
    assert all(torch.equal(v, from_file.state_dict()[k]) for k, v in from_folder.state_dict().items())


def test_wrong_base_and_wrong_files_are_named(base, tmp_path):
    _, base_ours = base
    path = tmp_path / "controlnet.safetensors"
    published_file(V21, path)
    shallow = ZImageConfig(dim=32, n_heads=2, n_kv_heads=2, n_layers=20, cap_feat_dim=16, axes_dims=(4, 6, 6))
    with pytest.raises(CheckpointError, match="does not fit the transformer: it hints main layer 28, the transformer has 20"):
        load_controlnet(path, shallow)
    wide = ZImageConfig(dim=64, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=(8, 12, 12))
    with pytest.raises(CheckpointError, match="width 32 with 2 heads, the transformer 64 with 2"):
        load_controlnet(path, wide)
    transformer = tmp_path / "transformer.safetensors"
    save_file(base_ours.state_dict(), transformer)
    (tmp_path / "config.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="holds a Z-Image transformer .*, not a Z-Image ControlNet"):
        load_controlnet(transformer, base_ours.cfg)
    with pytest.raises(CheckpointError, match="holds Z-Image-Turbo Fun ControlNet Union 2.1 .*, not Z-Image"):
        load_transformer(path)


def test_unknown_refiner_mode_is_named(tmp_path):
    ref, _ = published_file(V1, tmp_path / "controlnet.safetensors")
    ref.save_pretrained(tmp_path / "controlnet")
    config = tmp_path / "controlnet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"add_control_noise_refiner": "both"}))
    with pytest.raises(CheckpointError, match="add_control_noise_refiner must be one of"):
        load_controlnet(tmp_path / "controlnet", ZImageConfig())
    assert read_state_dict(tmp_path / "controlnet.safetensors")  # the file itself is fine


def bf16_errors(base_kwargs: dict, controlnet_kwargs: dict, cap_len: int, latent: int, device: str) -> tuple[float, float]:
    """(diffusers bf16 error, ours bf16 error) of Z-Image + a 2.1 ControlNet against diffusers in fp32, random weights."""
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.device(device):
        base_ref = randomize_(ZImageTransformer2DModel(**base_kwargs), std=0.02).eval()
        ref = randomize_(ZImageControlNetModel(**DIFFUSERS_CONFIGS[V21], **controlnet_kwargs), seed=1, std=0.02).eval()
    g = torch.Generator(device).manual_seed(2)
    x = torch.randn(1, 16, latent, latent, generator=g, device=device)
    control = torch.randn(1, 33, latent, latent, generator=g, device=device)
    cap, t = torch.randn(1, cap_len, base_ref.config.cap_feat_dim, generator=g, device=device), torch.tensor([0.4], device=device)
    mask = torch.ones(1, cap_len, dtype=torch.bool, device=device)
    own_keys = set(ref.state_dict())  # from_transformer (in diffusers_output) attaches the base's modules to it

    def run_ref() -> torch.Tensor:
        dtype = base_ref.dtype
        return diffusers_output(base_ref, ref, x.to(dtype), t, cap.to(dtype), mask, control.to(dtype), scale=0.75).float()

    with torch.no_grad():
        expected = run_ref()
        base_ref.to(torch.bfloat16), ref.to(torch.bfloat16)  # in place: the fp32 copies are gone from here on
        err_ref = rel_err(run_ref(), expected)
        cfg = ZImageConfig.from_diffusers(dict(base_ref.config))
        base = load_into(build_on_meta(lambda: ZImageTransformer(cfg)), from_diffusers(base_ref.state_dict()))
        controlnet_cfg = ControlNetConfig.from_diffusers(dict(ref.config))
        controlnet = load_into(build_on_meta(lambda: ZImageControlNet(controlnet_cfg)), controlnet_from_diffusers(
            {k: v for k, v in ref.state_dict().items() if k in own_keys}))
        del base_ref, ref
        err_ours = rel_err(base(x, t, cap, control=controlnet.bind(base, control, scale=0.75)), expected)
    return err_ref, err_ours


def test_bf16_error_tiny_cpu():
    """The GPU test's code path, at a tiny size on the CPU."""
    err_ref, err_ours = bf16_errors(BASE, WIDTHS, cap_len=20, latent=8, device="cpu")
    assert err_ours <= 1.25 * err_ref + 1e-3


@pytest.mark.gpu
def test_bf16_error_full_size():
    """ControlNet 2.1 with Z-Image-Turbo at 1024x1024 (4096 image tokens, a 100-token caption), random weights:
    our bf16 error against diffusers' fp32 output at most 1.25x diffusers' own bf16 error. ~40 GB of GPU memory."""
    err_ref, err_ours = bf16_errors(dict(axes_lens=[1536, 512, 512]), dict(control_in_dim=33), cap_len=100, latent=128, device="cuda")
    print(f"\nZ-Image-Turbo + ControlNet 2.1 bf16 vs fp32: diffusers {err_ref:.3e}, zflux {err_ours:.3e}, "
          f"ratio {err_ours / err_ref:.3f}")
    assert err_ours <= 1.25 * err_ref


def test_zflux_info_names_the_variant(tmp_path, capsys):
    for variant in PRESETS:
        published_file(variant, tmp_path / f"{variant}.safetensors")
        main(["info", str(tmp_path / f"{variant}.safetensors")])
        out = capsys.readouterr().out
        assert "family:     a Z-Image ControlNet" in out and f"what:       {CONTROLNETS[variant]}" in out
    assert "Union 2.0" in CONTROLNETS[V20] and "Union 2.1" in CONTROLNETS[V21] and "v1" in CONTROLNETS[V1]


def test_unpublished_layout_needs_its_config(base, tmp_path):
    """Two control blocks match no published variant: identify says so, and a file without config.json is refused."""
    _, base_ours = base
    ref = randomize_(ZImageControlNetModel(control_layers_places=[0, 3], control_refiner_layers_places=[0],
                                           add_control_noise_refiner="control_noise_refiner", **WIDTHS)).eval()
    save_file(ref.state_dict(), tmp_path / "custom.safetensors")
    info = identify(tmp_path / "custom.safetensors")
    assert info.variant is None and "with 2 control blocks (no published variant)" in info.description
    with pytest.raises(CheckpointError, match="a config.json beside it must say where its hints go"):
        load_controlnet(tmp_path / "custom.safetensors", base_ours.cfg)
    ref.save_pretrained(tmp_path / "custom")
    assert load_controlnet(tmp_path / "custom", base_ours.cfg, dtype=torch.float32).cfg.control_layers_places == (0, 3)
