"""How far fp8 (common/fp8.py) moves whole runs from bf16, per-row against per-tensor scales.

    python scripts/bench_fp8_quality.py                          # both parts, on the GPU
    python scripts/bench_fp8_quality.py --only small --device cpu    # the trained small models, on the CPU

`random`: Z-Image-Turbo (8 steps), FLUX.1-dev (28 steps, guidance 3.5) and FLUX.2 klein 4B (4 steps) at 1024x1024, random weights at the
real sizes (GPU), random caption features, the same start noise: relative L2 error of the final latents of each
fp8 scheme against the bf16 run, the mean (and spread) over --seeds draws of weights, noise and captions (one
draw's difference between the schemes is within what another draw moves either). `small`: zflux's trained small models (zimg/embedded, flux/embedded; 128x128
pictures of coloured shapes) generating from captions they were trained on, same seeds: SSIM and PSNR of each fp8
scheme's decoded picture against the unquantized run's (bf16 on the GPU, fp32 on the CPU), mean over the prompts.

Schemes: `per-row` (what precision="fp8" runs: weights per output channel, activations per token), with the fp8
attention kernel (where it runs: a GPU with fp8 tensor cores) and without it (ZFLUX_FP8_ATTENTION=0), and
`per-tensor` (one scale per weight and per activation tensor, as published scaled-fp8 checkpoints), with and without
fp8 attention; `random` also prints each pair's paired difference (same draws). On the CPU the
fp8 linears run the reference path (dequantize, matmul in fp32) and attention is never fp8. Prints markdown.
"""

import argparse
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench import random_model
from zflux.common.fp8 import quantize_model
from zflux.common.pipeline import denoise
from zflux.common.shapes import caption, random_scene
from zflux.common.weights import build_on_meta, load_into
from zflux.flux import pipeline as flux
from zflux.flux.flux2 import pipeline as flux2
from zflux.flux.flux2.model import Flux2
from zflux.zimg import pipeline as zimage

SCHEMES = {  # name: (scale granularity, fp8 attention)
    "per-row": ("per-row", False),
    "per-row + fp8 attention": ("per-row", True),
    "per-tensor": ("per-tensor", False),
    "per-tensor + fp8 attention": ("per-tensor", True),
}
PAIRS = [("per-row", "per-tensor"), ("per-row + fp8 attention", "per-tensor + fp8 attention")]  # the scales compared
PROMPTS = 4  # small models: captions of scenes drawn as in training
EMBEDDED_SIZE = zimage.EMBEDDED_SIZE  # both small models' training size


@contextmanager
def scheme_env(attention: bool) -> Iterator[None]:
    """ZFLUX_FP8_ATTENTION set for the scheme, restored after."""
    previous = os.environ.get("ZFLUX_FP8_ATTENTION")
    os.environ["ZFLUX_FP8_ATTENTION"] = "1" if attention else "0"
    try:
        yield
    finally:
        os.environ.pop("ZFLUX_FP8_ATTENTION") if previous is None else os.environ.update(ZFLUX_FP8_ATTENTION=previous)


def quantized_copy(model: torch.nn.Module, factory: Callable[[], torch.nn.Module], granularity: str) -> torch.nn.Module:
    """A copy of `model` with its blocks' linears in fp8 at `granularity` (the original keeps its weights)."""
    copy = load_into(build_on_meta(factory), {k: v.clone() for k, v in model.state_dict().items()})
    copy.fp8_attention = True
    return quantize_model(copy, granularity)


def zimage_run(device: str, seed: int) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]:
    """Z-Image-Turbo's transformer factory, and a whole 8-step run of a transformer from noise and captions drawn with `seed`."""
    variant = zimage.VARIANTS["z-image-turbo"]
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(1, 16, 128, 128, generator=g, device=device)
    features = torch.randn(1, 128, variant.model.cap_feat_dim, generator=g, device=device)
    mask = torch.ones(1, 128, dtype=torch.bool, device=device)
    sigmas = variant.scheduler.schedule(variant.defaults.steps, 4096)

    def run(model: torch.nn.Module) -> torch.Tensor:
        predict = zimage.predictor(model, features=features.to(model.dtype), mask=mask, sigmas=sigmas,
                                   settings=variant.defaults, device=torch.device(device))
        with torch.no_grad():
            return denoise(predict, noise, sigmas, 0, progress=False)

    return lambda: zimage.ZImageTransformer(variant.model), run


def flux_run(device: str, seed: int) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]:
    """FLUX.1-dev's transformer factory, and a whole 28-step run (guidance 3.5) from noise and text drawn with `seed`."""
    variant = flux.VARIANTS["flux-dev"]
    g = torch.Generator(device).manual_seed(seed)
    tokens = flux.pack_latents(torch.randn(1, 16, 128, 128, generator=g, device=device))  # (1, 4096, 64)
    features = torch.randn(1, 512, variant.model.joint_attention_dim, generator=g, device=device)
    pooled = torch.randn(1, variant.model.pooled_projection_dim, generator=g, device=device)
    sigmas = variant.scheduler.schedule(variant.defaults.steps, 4096)

    def run(model: torch.nn.Module) -> torch.Tensor:
        predict = flux.predictor(model, features=features.to(model.dtype), pooled=pooled.to(model.dtype), size=(128, 128),
                                 sigmas=sigmas, guidance=variant.defaults.guidance, true_cfg=1.0, device=torch.device(device))
        with torch.no_grad():
            return denoise(predict, tokens, sigmas, 0, progress=False)

    return lambda: flux.Flux(variant.model), run


def flux2_run(device: str, seed: int) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]:
    """FLUX.2 klein 4B's transformer factory, and a whole 4-step run from noise and text drawn with `seed`."""
    variant = flux2.VARIANTS["flux2-klein-4b"]
    g = torch.Generator(device).manual_seed(seed)
    tokens = torch.randn(1, 4096, 128, generator=g, device=device)  # a 64 x 64 grid of packed tokens
    text = torch.randn(1, 512, variant.model.joint_attention_dim, generator=g, device=device)
    sigmas = flux2.flux2_sigmas(variant.scheduler, variant.defaults.steps, 4096)

    def run(model: torch.nn.Module) -> torch.Tensor:
        predict = flux2.predictor(model, text=text.to(model.dtype), size=(64, 64), sigmas=sigmas, guidance=1.0, refs=None,
                                  kv=False, device=torch.device(device))
        with torch.no_grad():
            return denoise(predict, tokens, sigmas, 0, progress=False)

    return lambda: Flux2(variant.model), run


def bench_random(device: str, seeds: int) -> None:
    print(f"\n### fp8 vs bf16, whole runs at 1024x1024, random weights: relative L2 error of the final latents, mean "
          f"(min-max) over {seeds} seeds\n")
    pairs = [f"{a} - {b}" for a, b in PAIRS]
    print("| model | " + " | ".join([*SCHEMES, *pairs]) + " |")
    print("|---" * (len(SCHEMES) + len(PAIRS) + 1) + "|")
    for name, make in [("Z-Image-Turbo, 8 steps", zimage_run), ("FLUX.1-dev, 28 steps", flux_run),
                       ("FLUX.2 klein 4B, 4 steps", flux2_run)]:
        errors = np.zeros((seeds, len(SCHEMES)))  # (seed, scheme)
        for seed in range(seeds):
            torch.manual_seed(seed)  # the random weights
            factory, run = make(device, seed)
            model = random_model(factory)
            reference = run(model).float()
            for j, (granularity, attention) in enumerate(SCHEMES.values()):
                with scheme_env(attention):
                    quantized = quantized_copy(model, factory, granularity)
                    latents = run(quantized).float()
                errors[seed, j] = ((latents - reference).norm() / reference.norm()).item()
                del quantized
                torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
        cells = [f"{e.mean():.4f} ({e.min():.4f}-{e.max():.4f})" for e in errors.T]
        print(f"| {name} | " + " | ".join(cells + [paired(errors, a, b) for a, b in PAIRS]) + " |", flush=True)


def paired(errors: np.ndarray, a: str, b: str) -> str:
    """Scheme a's error minus b's over the same draws (seed, scheme): the mean, its standard error, and on how many
    draws a was the closer. A draw moves both errors alike, so the difference on one draw says more than their spreads."""
    names = list(SCHEMES)
    diff = errors[:, names.index(a)] - errors[:, names.index(b)]
    error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return f"{diff.mean():+.4f} +- {error:.4f} ({int((diff < 0).sum())}/{len(diff)} closer)"


def image_metrics(image, reference) -> tuple[float, float]:
    """(SSIM, PSNR dB) of an RGB picture against a reference, 8-bit."""
    a, b = np.asarray(image), np.asarray(reference)
    return structural_similarity(a, b, channel_axis=-1, data_range=255), peak_signal_noise_ratio(b, a, data_range=255)


def small_model_quality(pipeline: type, folder: str, device: str, dtype: torch.dtype, prompts: list[str]) -> list[str]:
    """Per scheme, mean SSIM / PSNR over `prompts` of the trained small model in `folder` with fp8 linears against the
    same model unquantized (in `dtype`), same seeds."""
    pipe = pipeline.from_pretrained(folder, device=device, dtype=dtype)
    where = dict(height=EMBEDDED_SIZE, width=EMBEDDED_SIZE, progress=False)
    reference = [pipe.generate(p, seed=i, **where) for i, p in enumerate(prompts)]
    original = pipe.transformer
    cells = []
    for granularity, attention in SCHEMES.values():
        with scheme_env(attention):
            pipe.transformer = quantized_copy(original, lambda: type(original)(original.cfg), granularity)
            metrics = [image_metrics(pipe.generate(p, seed=i, **where), ref)
                       for i, (p, ref) in enumerate(zip(prompts, reference))]
        ssim, psnr = np.mean(metrics, axis=0)
        cells.append(f"{ssim:.4f} / {psnr:.1f} dB")
    return cells


def training_prompts(n: int = PROMPTS) -> list[str]:
    """English captions of `n` scenes drawn as the small models' training data is (common/shapes.py), seeds 0..n-1."""
    return [caption(random_scene(random.Random(seed))) for seed in range(n)]


def bench_small(device: str) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\n### fp8 vs {'bf16' if device == 'cuda' else 'fp32'}, zflux's trained small models at 128x128 ({device}): "
          f"SSIM / PSNR of the decoded pictures, mean of {PROMPTS} prompts\n")
    print("| model | " + " | ".join(SCHEMES) + " |")
    print("|---" * (len(SCHEMES) + 1) + "|")
    for name, pipeline, folder in [("Z-Image-Turbo-shaped", zimage.ZImagePipeline, zimage.EMBEDDED_MODEL),
                                   ("FLUX.1-dev-shaped", flux.FluxPipeline, flux.EMBEDDED_MODEL)]:
        cells = small_model_quality(pipeline, folder, device, dtype, training_prompts())
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["random", "small"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3, help="random: draws of weights, noise and captions to average over")
    args = parser.parse_args()
    if args.only != "small":
        bench_random(args.device, args.seeds)
    if args.only != "random":
        bench_small(args.device)


if __name__ == "__main__":
    main()
