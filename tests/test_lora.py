"""LoRA files (common/lora.py): every format diffusers converts, on each family, against diffusers' load_lora_weights.

Each test writes a random LoRA file in one format, loads it into diffusers (its pipeline's
load_lora_weights, then set_adapters at the same scale) and into our model, fused and unfused, and
compares the transformer outputs (fp32, relative error <= 1e-5: the LoRA adds its own summation
order, fused in one fp32 matmul against PEFT's two, around 1e-7 measured). Unloading must give back
the exact weights. Formats whose diffusers converter assumes FLUX.1's full widths (kohya single
blocks, BFL control and fal Kontext LoRAs, which name all 19 + 38 blocks) run a full-width
transformer with one single block; diffusers is handed the file for the full model, whose other
blocks it skips, ours the same LoRA for the blocks the model has.
"""

import time
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline as DiffusersFlux2
from diffusers import FluxControlPipeline as DiffusersFluxControl
from diffusers import FluxPipeline as DiffusersFlux
from diffusers import FluxTransformer2DModel
from diffusers import ZImagePipeline as DiffusersZImage
import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

import test_flux2_model as flux2_model
import test_flux_model as flux_model
import test_zimg_model as zimg_model
from test_cli import CPU, fails
from test_graphs import fake  # noqa: F401 (fixture: CUDA graph capture faked on the CPU)
from test_cli import run as run_cli
from test_pipelines import FP32, H, PROMPT, W, noise, pack, unpack
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse, one CPU thread)
from util import rel_err
from zflux.flux.flux2.pipeline import Flux2Pipeline
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg.pipeline import ZImagePipeline
from zflux.common.graphs import graphed
from zflux.common.lora import KeyMap, LoraSet, read_lora
from zflux.common.weights import CheckpointError
from zflux.flux import convert as flux_convert
from zflux.flux.flux2 import convert as flux2_convert
from zflux.flux.lora import XLABS
from zflux.flux.model import Flux, FluxConfig
from zflux.zimg import convert as zimg_convert

TOL = 1e-5
SCALE = 0.8
RANK = 4
NO_PARTS = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None)
# FLUX.1 at full width (24 heads of 128) with one single block: what converters that assume FLUX.1-dev's widths need.
FULL_WIDTH = FluxConfig(num_layers=0, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True)


def linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_file(path: Path, modules: dict[str, tuple[int, int]], down: str, up: str, alpha: str | None = None, seed: int = 0,
              rank: int = RANK) -> Path:
    """A random LoRA for `modules` (file name -> (out, in)) with keys name + down / up (/ alpha) suffixes; alphas differ
    from the rank, so that alpha / rank matters: per module in kohya-style files (diffusers folds each into its module),
    one for all in lora_A / lora_B files (PEFT's alpha_pattern, a suffix match, would give `proj_out`'s alpha to
    every `*.proj_out`)."""
    tensors = {}
    for i, (name, (rows, cols)) in enumerate(modules.items()):
        g = generator(name, seed)
        tensors[name + down] = torch.randn(rank, cols, generator=g) / cols ** 0.5
        tensors[name + up] = torch.randn(rows, rank, generator=g) * 0.3
        if alpha is not None:
            tensors[name + alpha] = torch.tensor(float(rank + 1 + (i % 3 if down == ".lora_down.weight" else 0)))
    save_file(tensors, path)
    return path


def generator(name: str, seed: int = 0) -> torch.Generator:
    """Random numbers of their own for each module: a file for more blocks holds the same tensors for the shared ones."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)


def kohya(names: dict[str, tuple[int, int]], prefix: str = "lora_unet_") -> dict[str, tuple[int, int]]:
    return {prefix + name.replace(".", "_"): shape for name, shape in names.items()}


def prefixed(names: dict[str, tuple[int, int]], prefix: str) -> dict[str, tuple[int, int]]:
    return {prefix + name: shape for name, shape in names.items()}


def ours_with(model: torch.nn.Module, family: str, path: Path, fuse: bool, scale: float = SCALE) -> LoraSet:
    keys = {"flux.1": lambda: KeyMap(model, flux_convert.to_diffusers, aliases=XLABS),
            "flux.2": lambda: KeyMap(model, flux2_convert.to_diffusers), "z-image": lambda: KeyMap(model, zimg_convert.to_diffusers)}
    loras = LoraSet({"transformer": keys[family]()}, family)
    loras.load(path, scale=scale, fuse=fuse)
    return loras


def check_both_ways(ours: torch.nn.Module, family: str, path: Path, run_ours, expected: torch.Tensor) -> None:
    """Fused and unfused, our output matches diffusers'; unloading restores the exact weights."""
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for fuse in (True, False):
        loras = ours_with(ours, family, path, fuse)
        assert rel_err(run_ours(), expected) <= TOL, f"fuse={fuse}"
        loras.unload()
        after = ours.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def diffusers_output(pipe, path: Path, run, scale: float = SCALE) -> torch.Tensor:
    pipe.load_lora_weights(path, adapter_name="a")
    pipe.set_adapters(["a"], [scale])
    return run()


# -- FLUX.1 at tiny widths --

def flux_case():
    ref, ours = flux_model.make_pair(flux_model.DEV)
    inputs = flux_model.make_inputs(flux_model.DEV, 1, 4, 6, 5)
    pipe = DiffusersFlux(**NO_PARTS, text_encoder_2=None, tokenizer_2=None, transformer=ref)
    return ref, ours, pipe, lambda: flux_model.run_diffusers(ref, inputs), lambda: ours(**inputs)


def flux_blocks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The blocks' Linears but single blocks' linear1."""
    return {k: v for k, v in linears(model).items() if "blocks" in k and not k.endswith("linear1")}


FLUX_FORMATS = {  # format -> (module names the file uses, from (diffusers model, ours) -> file keys (down, up, alpha))
    "diffusers": (lambda ref, ours: prefixed(linears(ref), "transformer."), (".lora_A.weight", ".lora_B.weight", ".alpha")),
    "diffusers, no alpha": (lambda ref, ours: prefixed(linears(ref), "transformer."), (".lora_A.weight", ".lora_B.weight", None)),
    # kohya and ComfyUI: diffusers' converter drops the top-level modules (no `transformer.` prefix) and splits
    # single blocks' linear1 at full widths: the blocks' other modules here, linear1 at full width below.
    "kohya": (lambda ref, ours: kohya(flux_blocks(ours)), (".lora_down.weight", ".lora_up.weight", ".alpha")),
    "ComfyUI": (lambda ref, ours: prefixed(flux_blocks(ours), "diffusion_model."),
                (".lora_down.weight", ".lora_up.weight", ".alpha")),
    # mixture: diffusers' converter reads the blocks' attention projections and the top-level modules only
    "mixture": (lambda ref, ours: kohya({k: v for k, v in linears(ref).items() if ".attn." in k or "blocks" not in k}, "lora_transformer_"),
                (".lora_down.weight", ".lora_up.weight", ".alpha")),
    "XLabs": (lambda ref, ours: xlabs_names(ours), (".down.weight", ".up.weight", None)),
}


def xlabs_names(ours: Flux) -> dict[str, tuple[int, int]]:
    dim = ours.cfg.hidden_size
    names = {}
    for i in range(ours.cfg.num_layers):
        for n in (1, 2):
            names[f"double_blocks.{i}.processor.qkv_lora{n}"] = (3 * dim, dim)
            names[f"double_blocks.{i}.processor.proj_lora{n}"] = (dim, dim)
    for i in range(ours.cfg.num_single_layers):
        names[f"single_blocks.{i}.processor.qkv_lora"] = (3 * dim, dim)
        names[f"single_blocks.{i}.processor.proj_lora"] = (dim, dim + ours.single_blocks[i].mlp_hidden)
    return names


# -- FLUX.1 at full width --

@pytest.fixture(scope="module")
def full_width():
    """The full-width transformer's diffusers weights (random), built once."""
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**flux_model.diffusers_kwargs(FULL_WIDTH))
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.1) for k, v in ref.state_dict().items()}


def full_width_case(weights: dict, in_channels: int = 64):
    with torch.device("meta"):
        ref, ours = FluxTransformer2DModel(**flux_model.diffusers_kwargs(FULL_WIDTH)), Flux(FULL_WIDTH)
    ref.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)  # clones: LoRAs change weights in place
    ours.load_state_dict({k: v.clone() for k, v in flux_convert.from_diffusers(weights).items()}, assign=True)
    cfg = FluxConfig(**{**FULL_WIDTH.__dict__, "in_channels": in_channels})
    inputs = flux_model.make_inputs(cfg, 1, 2, 4, 3)
    pipe = DiffusersFlux(**NO_PARTS, text_encoder_2=None, tokenizer_2=None, transformer=ref.eval())
    return ref, ours.eval(), pipe, lambda: flux_model.run_diffusers(ref, inputs), lambda: ours(**inputs)


def full_flux_linears(in_channels: int = 64) -> dict[str, tuple[int, int]]:
    """Every Linear of FLUX.1-dev's 19 + 38 blocks at the test's text widths (BFL names), img_in with `in_channels` inputs."""
    cfg = FluxConfig(**{**FULL_WIDTH.__dict__, "in_channels": in_channels, "num_layers": 19, "num_single_layers": 38})
    with torch.device("meta"):
        return linears(Flux(cfg))


@torch.no_grad()
def test_flux_kohya_linear1_at_full_width(tmp_path, full_width):
    ref, ours, pipe, run_ref, run_ours = full_width_case(full_width)
    names = kohya({k: v for k, v in linears(ours).items() if k.endswith("linear1")})
    path = lora_file(tmp_path / "kohya.safetensors", names, ".lora_down.weight", ".lora_up.weight", ".alpha")
    check_both_ways(ours, "flux.1", path, run_ours, diffusers_output(pipe, path, run_ref))


def with_bias_and_norms(path: Path, model_names: dict[str, tuple[int, int]], head_dim: int = 128) -> Path:
    """Add lora_B biases and the QK-norm scales a BFL control LoRA carries."""
    tensors = load_file(path)
    for name, (rows, _) in model_names.items():
        tensors[f"{name}.lora_B.bias"] = torch.randn(rows, generator=generator(name, 9)) * 0.1
    blocks = {".".join(k.split(".")[:2]) for k in model_names if k.startswith(("double_blocks.", "single_blocks."))}
    # diffusers 0.42.1's control converter swaps the halves of the final adaLN's lora_A as well as lora_B's (its
    # rank halves: a wrong product); with equal halves that swap changes nothing, and the rest is compared.
    down = tensors["final_layer.adaLN_modulation.1.lora_A.weight"]
    tensors["final_layer.adaLN_modulation.1.lora_A.weight"] = down[: len(down) // 2].repeat(2, 1)
    for block in sorted(blocks):
        for norm in ("img_attn.norm", "txt_attn.norm") if block.startswith("double") else ("norm",):
            for which in ("query_norm", "key_norm"):
                key = f"{block}.{norm}.{which}.scale"
                tensors[key] = 1 + 0.1 * torch.randn(head_dim, generator=generator(key))
    save_file(tensors, path)
    return path


CONTROL_WIDTH = 128


@pytest.mark.parametrize("fmt", ["BFL control", "fal Kontext"])
@torch.no_grad()
def test_flux_full_size_formats_at_full_width(tmp_path, full_width, fmt):
    """BFL control (norm scales replaced, img_in widened to 128 inputs, lora_B biases) and fal Kontext LoRAs: diffusers'
    converters read all 19 + 38 blocks of FLUX.1-dev; ours gets the same LoRA for the blocks the model has. Fusing at
    this width takes seconds on the CPU: both run as side paths here (fusing a control LoRA, biases included, is
    test_control_lora_makes_dev_a_control_pipeline's; fusing at full width test_flux_kohya_linear1_at_full_width's)."""
    control = fmt == "BFL control"
    ref, ours, pipe, run_ref, run_ours = full_width_case(full_width, CONTROL_WIDTH if control else 64)
    if control:
        pipe = DiffusersFluxControl(**NO_PARTS, text_encoder_2=None, tokenizer_2=None, transformer=ref)
    prefix = "" if control else "base_model.model."
    width = CONTROL_WIDTH if control else 64
    everything = full_flux_linears(width)
    if not control:  # fal's converter reads the blocks and final_layer.linear only
        everything = {k: v for k, v in everything.items() if "blocks" in k or k == "final_layer.linear"}
    present = {k: v for k, v in everything.items() if not k.startswith(("double_blocks", "single_blocks.")) or k.startswith("single_blocks.0.")}
    files = []
    for name, names in (("full", everything), ("ours", present)):
        path = lora_file(tmp_path / f"{name}.safetensors", prefixed(names, prefix), ".lora_A.weight", ".lora_B.weight", rank=2)
        files.append(with_bias_and_norms(path, names) if control else path)
    assert read_lora(files[1]).format == fmt
    expected = diffusers_output(pipe, files[0], run_ref)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    loras = LoraSet({"transformer": KeyMap(ours, flux_convert.to_diffusers)}, "flux.1", widen=("img_in", lambda path, width: widen(ours, width)))
    loras.load(files[1], scale=SCALE, fuse=False)
    assert ours.img_in.in_features == width
    assert rel_err(run_ours(), expected) <= TOL
    loras.unload()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items()) and ours.img_in.in_features == 64


def widen(model: Flux, width: int):
    from zflux.flux.lora import widen_input
    return widen_input(model, width)


# -- Z-Image --

def zimage_case():
    ref, ours = zimg_model.make_pair(zimg_model.TINY)
    g = torch.Generator().manual_seed(1)
    x, t, cap = torch.randn(1, 16, 4, 6, generator=g), torch.rand(1, generator=g), torch.randn(1, 9, 32, generator=g)
    pipe = DiffusersZImage(**NO_PARTS, transformer=ref)
    return ref, ours, pipe, lambda: torch.stack(ref([x[0][:, None]], t, [cap[0]], return_dict=False)[0])[:, :, 0], \
        lambda: ours(x, t, cap)


def zimage_dot(ours) -> dict[str, tuple[int, int]]:
    """Dot-format names: the fused qkv of layer 0 (split by diffusers), to.q / to.k / to.v and a bare out elsewhere."""
    names = {}
    for name, shape in linears(ours).items():
        if ".attention.qkv" in name and name.startswith("layers.0."):
            names[name] = shape
        elif ".attention.qkv" in name:
            names.update({name.replace("qkv", f"to.{p}"): (shape[0] // 3, shape[1]) for p in "qkv"})
        elif "feed_forward" in name or ".attention.out" in name:
            names[name] = shape
    return names


ZIMAGE_FORMATS = {  # diffusers: with the `transformer.` prefix and no alphas, or alphas and no prefix (its converter adds one)
    "diffusers": (lambda ref, ours: prefixed(linears(ref), "transformer."), (".lora_A.weight", ".lora_B.weight", None)),
    "diffusers, alphas": (lambda ref, ours: linears(ref), (".lora_A.weight", ".lora_B.weight", ".alpha")),
    "kohya": (lambda ref, ours: kohya({k: v for k, v in linears(ref).items() if "embedder" not in k and "final" not in k}),
              (".lora_down.weight", ".lora_up.weight", ".alpha")),
    "ComfyUI": (lambda ref, ours: prefixed({k.replace("to_out.0", "out"): v for k, v in linears(ref).items() if "attention" in k},
                                          "diffusion_model."), (".lora_down.weight", ".lora_up.weight", ".alpha")),
    "Z-Image dot": (lambda ref, ours: prefixed(zimage_dot(ours), "diffusion_model."), (".lora.down.weight", ".lora.up.weight", None)),
}


# -- FLUX.2 --

def flux2_case():
    ref, ours = flux2_model.make_pair(flux2_model.KLEIN)
    inputs = flux2_model.make_inputs(flux2_model.KLEIN, 1, 2, 3, 5)
    pipe = DiffusersFlux2(**NO_PARTS, transformer=ref)
    return ref, ours, pipe, lambda: flux2_model.run_diffusers(ref, inputs), lambda: ours(**inputs)


def flux2_official(ours) -> dict[str, tuple[int, int]]:
    """Our Linears but the final adaLN projection: diffusers 0.42.1's FLUX.2 converter renames it to norm_out.linear without
    swapping its (shift, scale) halves into diffusers' (scale, shift) order, so diffusers applies such a LoRA halves swapped."""
    return {k: v for k, v in linears(ours).items() if k != "final_layer.adaLN_modulation.1"}


FLUX2_FORMATS = {
    "diffusers": (lambda ref, ours: prefixed(linears(ref), "transformer."), (".lora_A.weight", ".lora_B.weight", None)),
    "ai-toolkit": (lambda ref, ours: prefixed(flux2_official(ours), "diffusion_model."), (".lora_A.weight", ".lora_B.weight", None)),
    "fal Kontext": (lambda ref, ours: prefixed(flux2_official(ours), "base_model.model."), (".lora_A.weight", ".lora_B.weight", None)),
    "kohya": (lambda ref, ours: kohya({k: v for k, v in linears(ours).items() if "blocks" in k}),
              (".lora_down.weight", ".lora_up.weight", ".alpha")),
}


FORMATS = {"flux.1": (flux_case, FLUX_FORMATS), "z-image": (zimage_case, ZIMAGE_FORMATS), "flux.2": (flux2_case, FLUX2_FORMATS)}


@pytest.mark.parametrize("family, fmt", [(family, fmt) for family, (_, formats) in FORMATS.items() for fmt in formats])
@torch.no_grad()
def test_formats_match_diffusers(tmp_path, family, fmt):
    """Each family's formats at tiny widths (FLUX.2's fal Kontext spelling, a PEFT `base_model.model.` prefix, is how PEFT
    saves FLUX.2 LoRAs too)."""
    case, formats = FORMATS[family]
    ref, ours, pipe, run_ref, run_ours = case()
    names, suffixes = formats[fmt]
    path = lora_file(tmp_path / "lora.safetensors", names(ref, ours), *suffixes)
    assert read_lora(path).format == fmt.split(",")[0] and read_lora(path).family == family
    check_both_ways(ours, family, path, run_ours, diffusers_output(pipe, path, run_ref))


# -- pipelines: final latents against diffusers' pipelines, text-encoder parts included --

@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {"flux-dev": flux_snapshot(root / "dev", "flux-dev"), "z-image-turbo": zimage_snapshot(root / "turbo"),
            "flux2-klein": flux2_snapshot(root / "klein", "flux2-klein")}


def flux_pipeline_lora(path: Path, pipe: FluxPipeline) -> Path:
    """kohya: the transformer's blocks (but linear1) and CLIP's Linears as lora_te1_."""
    names = kohya(flux_blocks(pipe.transformer)) | kohya(linears(pipe.text_encoder.clip), "lora_te1_")
    return lora_file(path, names, ".lora_down.weight", ".lora_up.weight", ".alpha")


@pytest.mark.parametrize("fuse", [True, False])
def test_flux_pipeline_with_clip_lora_matches_diffusers(snapshots, tmp_path, fuse):
    ours = FluxPipeline.from_pretrained(snapshots["flux-dev"], **FP32)
    path = flux_pipeline_lora(tmp_path / "style.safetensors", ours)
    assert read_lora(path).text_encoder_modules
    ours.load_lora(path, scale=SCALE, fuse=fuse)
    got = ours.generate(PROMPT, height=H, width=W, steps=2, latents=noise(), output_type="latent", progress=False)
    ref = DiffusersFlux.from_pretrained(snapshots["flux-dev"])
    ref.set_progress_bar_config(disable=True)
    expected = unpack(diffusers_output(ref, path, lambda: ref(PROMPT, height=H, width=W, num_inference_steps=2, latents=pack(noise()),
                                                              max_sequence_length=512, output_type="latent").images))
    assert rel_err(got, expected) <= TOL
    clip = {k: v.clone() for k, v in ours.text_encoder.clip.state_dict().items()}
    ours.unload_lora()
    plain = ours.generate(PROMPT, height=H, width=W, steps=2, latents=noise(), output_type="latent", progress=False)
    assert rel_err(plain, got) > 1e-3 and all(torch.equal(v, clip[k]) for k, v in ours.text_encoder.clip.state_dict().items()) != fuse


@pytest.mark.parametrize("fuse", [True, False])
def test_a_clip_lora_drops_the_kept_prompt_encoding(snapshots, tmp_path, fuse):
    """The pipeline keeps the last prompt's encoding (common/offload.py): loading, rescaling or unloading a LoRA that changes
    CLIP encodes the same prompt anew, each result as the weights then are; a LoRA on the transformer alone keeps it."""
    pipe = FluxPipeline.from_pretrained(snapshots["flux-dev"], **FP32)
    clip = lora_file(tmp_path / "clip.safetensors", kohya(linears(pipe.text_encoder.clip), "lora_te1_"), ".lora_down.weight",
                     ".lora_up.weight", ".alpha")
    blocks = lora_file(tmp_path / "blocks.safetensors", kohya(flux_blocks(pipe.transformer)), ".lora_down.weight", ".lora_up.weight")
    stages = []
    enter = pipe.offload.enter
    pipe.offload.enter = lambda stage: stages.append(stage) or enter(stage)

    def run() -> torch.Tensor:
        return pipe.generate(PROMPT, height=H, width=W, steps=2, latents=noise(), output_type="latent", progress=False)

    plain = run()
    pipe.load_lora(clip, scale=SCALE, fuse=fuse)
    styled = run()
    assert not torch.equal(styled, plain)
    pipe.set_lora_scale(0.0)
    assert torch.equal(run(), plain)
    pipe.set_lora_scale(SCALE)
    assert torch.equal(run(), styled)
    pipe.unload_lora()
    assert torch.equal(run(), plain)
    assert stages.count("encode") == 5
    pipe.load_lora(blocks, scale=SCALE, fuse=fuse)
    run()
    assert stages.count("encode") == 5


def test_zimage_and_flux2_pipelines_match_diffusers(snapshots, tmp_path):
    zimage = ZImagePipeline.from_pretrained(snapshots["z-image-turbo"], **FP32)
    ref = DiffusersZImage.from_pretrained(snapshots["z-image-turbo"])
    ref.set_progress_bar_config(disable=True)
    names, suffixes = ZIMAGE_FORMATS["kohya"]
    path = lora_file(tmp_path / "z.safetensors", names(ref.transformer, None), *suffixes)
    zimage.load_lora(path, scale=SCALE)
    got = zimage.generate(PROMPT, height=H, width=W, steps=2, latents=noise(), output_type="latent", progress=False)
    expected = diffusers_output(ref, path, lambda: ref(PROMPT, height=H, width=W, num_inference_steps=2, guidance_scale=0.0,
                                                       latents=noise(), output_type="latent").images)
    assert rel_err(got, expected) <= TOL

    klein = Flux2Pipeline.from_pretrained(snapshots["flux2-klein"], **FP32)
    path = lora_file(tmp_path / "k.safetensors", prefixed(flux2_official(klein.transformer), "diffusion_model."), ".lora_A.weight",
                     ".lora_B.weight")
    klein.load_lora(path, scale=SCALE, fuse=False)
    got = klein.generate(PROMPT, seed=3, steps=2, height=48, width=64, output_type="latent", progress=False)
    ref = DiffusersFlux2.from_pretrained(snapshots["flux2-klein"]).to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = diffusers_output(ref, path, lambda: ref(prompt=PROMPT, generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                                                       height=48, width=64, output_type="latent").images)
    assert rel_err(got, expected) <= TOL


# -- several LoRAs, scales, unloading --

@torch.no_grad()
def test_several_loras_switchable_scales_and_exact_unload(tmp_path):
    """Two LoRAs (one fused, one side path), each at its own scale, equal diffusers' two adapters at those weights; new
    scales for both match too; unloading gives back the exact weights. The side path at scale 0 is the plain model."""
    ref, ours, pipe, run_ref, run_ours = flux_case()
    plain = run_ours()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    first = lora_file(tmp_path / "first.safetensors", prefixed(linears(ref), "transformer."), ".lora_A.weight", ".lora_B.weight")
    second = lora_file(tmp_path / "second.safetensors", kohya(flux_blocks(ours)), ".lora_down.weight", ".lora_up.weight", ".alpha", seed=1)
    loras = LoraSet({"transformer": KeyMap(ours, flux_convert.to_diffusers, aliases=XLABS)}, "flux.1")
    loras.load(first, scale=0.5, fuse=True)
    loras.load(second, scale=1.2, fuse=False)
    pipe.load_lora_weights(first, adapter_name="first")
    pipe.load_lora_weights(second, adapter_name="second")
    for scales in ([0.5, 1.2], [-0.7, 0.3]):
        loras.set_scale(scales)
        pipe.set_adapters(["first", "second"], scales)
        assert rel_err(run_ours(), run_ref()) <= TOL
    loras.set_scale(0.0)
    assert torch.equal(run_ours(), plain)
    loras.unload()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items()) and not loras.hooks
    assert torch.equal(run_ours(), plain)


@torch.no_grad()
def test_fused_lora_in_bf16_rounds_once_and_unfuses_exactly(tmp_path):
    """bf16 weights: fused = round(W + scale * B @ A) computed in fp32; unfusing restores every bit, including the elements
    where subtracting the update again would round elsewhere."""
    _, ours = flux_model.make_pair(flux_model.DEV)
    ours = ours.to(torch.bfloat16)
    path = lora_file(tmp_path / "l.safetensors", prefixed(linears(ours), "diffusion_model."), ".lora_A.weight", ".lora_B.weight")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    loras = ours_with(ours, "flux.1", path, fuse=True, scale=3.0)
    tensors = load_file(path)
    key = "diffusion_model.single_blocks.0.linear1"
    exact = before["single_blocks.0.linear1.weight"].double() + 3.0 * tensors[key + ".lora_B.weight"].double() @ tensors[key + ".lora_A.weight"].double()
    fused = ours.single_blocks[0].linear1.weight
    assert (fused == exact.to(torch.bfloat16)).float().mean() > 0.999  # rounded once (off only where fp32 sits at a tie)
    assert ((fused.double() - exact).abs() <= exact.abs() * 2 ** -8).all()  # within one bf16 step everywhere
    undo = loras.loras[0].undo
    assert sum(len(f.where) for f in undo.values()) > 0  # the record is needed: without it some elements would not come back
    loras.unload()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())


# -- control LoRA on the pipeline --

def test_control_lora_makes_dev_a_control_pipeline(snapshots, tmp_path):
    """A BFL control LoRA (here at the tiny dev's widths) widens img_in to 128 inputs: the pipeline runs as flux-depth (the
    file's name says which tool) and takes a control image; unloading makes it dev again."""
    pipe = FluxPipeline.from_pretrained(snapshots["flux-dev"], **FP32)
    names = linears(pipe.transformer) | {"img_in": (pipe.transformer.cfg.hidden_size, CONTROL_WIDTH)}
    path = with_bias_and_norms(lora_file(tmp_path / "flux1-depth-dev-lora.safetensors", names, ".lora_A.weight", ".lora_B.weight"),
                               names, head_dim=pipe.transformer.cfg.attention_head_dim)
    pipe.load_lora(path)
    assert pipe.variant == "flux-depth" and pipe.transformer.img_in.in_features == CONTROL_WIDTH
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    out = pipe.generate(PROMPT, height=H, width=W, steps=1, control_image=control, output_type="latent", progress=False)
    assert out.shape == (1, 16, H // 8, W // 8) and torch.isfinite(out).all()
    pipe.unload_lora()
    assert pipe.variant == "flux-dev" and pipe.transformer.img_in.in_features == 64


# -- what a file holds, and errors before any weight is touched --

def test_info_lines(tmp_path):
    _, ours = flux_model.make_pair(flux_model.DEV)
    names = kohya(flux_blocks(ours)) | {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}
    lines = read_lora(lora_file(tmp_path / "l.safetensors", names, ".lora_down.weight", ".lora_up.weight", ".alpha")).describe()
    assert lines[0] == "LoRA, kohya format, for FLUX.1"
    assert lines[1].startswith("rank 4; ") and "double_blocks_N_img_attn_qkv" in lines[1]
    assert lines[2] == "text encoder: 1 modules"


def test_errors_are_named_before_weights_change(tmp_path):
    ref, ours, *_ = flux_case()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    loras = LoraSet({"transformer": KeyMap(ours, flux_convert.to_diffusers, aliases=XLABS)}, "flux.1")
    zimage = lora_file(tmp_path / "z.safetensors", kohya(linears(zimg_model.make_pair(zimg_model.TINY)[1])), ".lora_down.weight",
                       ".lora_up.weight")
    with pytest.raises(CheckpointError, match=r"z\.safetensors: \d+ of \d+ LoRA modules match nothing in this FLUX.1 model "
                                              r"\(cap_embedder_1, .*\); the file looks like a Z-Image LoRA"):
        loras.load(zimage)
    wider = {k: (v[0], v[1] * 2) if k.endswith("img_attn.proj") else v for k, v in flux_blocks(ours).items()}
    with pytest.raises(CheckpointError, match=r"double_blocks_0_img_attn_proj \(our double_blocks.0.img_attn.proj\): the LoRA takes "
                                              r"64 inputs, the module 32: a LoRA for another model size\?"):
        loras.load(lora_file(tmp_path / "w.safetensors", kohya(wider), ".lora_down.weight", ".lora_up.weight"))
    save_file({"img_in.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is not a LoRA file: img_in.weight is no LoRA tensor"):
        loras.load(tmp_path / "model.safetensors")
    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="x has x.lora_A.weight but not both halves"):
        loras.load(tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        loras.set_scale(1.0)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())


def test_text_encoder_parts_without_a_text_encoder_warn(tmp_path):
    _, ours = zimg_model.make_pair(zimg_model.TINY)
    names = kohya(linears(ours)) | {"lora_te_model_layers_0_self_attn_q_proj": (32, 32)}
    path = lora_file(tmp_path / "l.safetensors", names, ".lora_down.weight", ".lora_up.weight")
    with pytest.warns(UserWarning, match="1 text-encoder LoRA modules skipped \\(model_layers_0_self_attn_q_proj, ...\\): Z-Image's"):
        ours_with(ours, "z-image", path, fuse=True)


# -- the command line --

def test_cli_lora_flag_and_info(snapshots, tmp_path, capsys):
    """--lora FILE:SCALE gives the image load_lora(FILE, SCALE) gives; another family's LoRA is refused before loading;
    `zflux info` describes a LoRA file."""
    pipe = FluxPipeline.from_pretrained(snapshots["flux-dev"], **FP32)
    path = flux_pipeline_lora(tmp_path / "style.safetensors", pipe)
    out = tmp_path / "cat.png"
    run_cli("generate", "--model", "flux-dev", "--weights", snapshots["flux-dev"], "--prompt", PROMPT, "--height", 32, "--width", 32,
            "--steps", 1, "--lora", f"{path}:{SCALE}", "--out", out, *CPU)
    pipe.load_lora(path, scale=SCALE)
    expected = np.asarray(pipe.generate(PROMPT, height=32, width=32, steps=1, progress=False), dtype=np.int16)
    with Image.open(out) as image:
        assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1
        assert "Lora: style.safetensors:0.8" in image.info["parameters"]

    zimage = lora_file(tmp_path / "z.safetensors", kohya(linears(zimg_model.make_pair(zimg_model.TINY)[1])), ".lora_down.weight",
                       ".lora_up.weight")
    message = fails(capsys, "generate", "--model", "flux-dev", "--weights", tmp_path / "not-read", "--prompt", PROMPT, "--lora",
                    zimage, "--out", out, *CPU)
    assert f"--lora {zimage}: a Z-Image LoRA; --model FLUX.1 needs one of its own" in message

    capsys.readouterr()
    run_cli("info", path)
    report = capsys.readouterr().out
    assert "LoRA, kohya format, for FLUX.1" in report and "text encoder: 12 modules" in report


# -- GPU --

@pytest.mark.gpu
@torch.no_grad()
def test_fusing_a_rank_64_lora_into_full_size_flux_dev_is_fast_and_exact(tmp_path):
    """Full-size FLUX.1-dev (random bf16 weights on the GPU), a rank-64 LoRA on every Linear: load_lora(fuse=True) in under
    2 s (the second load: the first warms CUDA up), unloading restores every bit, the side path changes the output alike."""
    with torch.device("meta"):
        model = Flux(FluxConfig(guidance_embeds=True))
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    for name, p in model.named_parameters():
        p.normal_(1.0 if "norm" in name else 0.0, 0.02)
    path = lora_file(tmp_path / "rank64.safetensors", prefixed(linears(model), "diffusion_model."), ".lora_A.weight", ".lora_B.weight",
                     rank=64)
    fingerprint = lambda: [int(p.view(torch.int16).sum(dtype=torch.int64)) for p in model.parameters()]  # noqa: E731
    before = fingerprint()
    loras = LoraSet({"transformer": KeyMap(model, flux_convert.to_diffusers)}, "flux.1")
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loras.load(path, fuse=True)
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        loras.unload()
        assert fingerprint() == before
    assert took < 2.0, f"fusing took {took:.2f} s"


@torch.inference_mode()
def test_side_path_changes_drop_cuda_graphs(fake, tmp_path):
    """A captured CUDA graph replays the forward as it was: attaching, rescaling or removing a side path must drop it
    (fusing changes weights in place, which graphs read anew). The fake capture of test_graphs.py stands in on the CPU."""
    ref, ours, pipe, run_ref, run_ours = flux_case()
    inputs = flux_model.make_inputs(flux_model.DEV, 1, 4, 6, 5)
    forward = graphed(ours)
    path = lora_file(tmp_path / "l.safetensors", prefixed(linears(ref), "transformer."), ".lora_A.weight", ".lora_B.weight")
    loras = LoraSet({"transformer": KeyMap(ours, flux_convert.to_diffusers)}, "flux.1")
    plain = forward(**inputs)
    for change in (lambda: loras.load(path, fuse=False), lambda: loras.set_scale(0.5), loras.unload):
        assert forward.graphs
        change()
        assert not forward.graphs
        forward(**inputs)
    assert torch.equal(forward(**inputs), plain)
