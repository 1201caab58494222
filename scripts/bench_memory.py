"""Memory and speed of the small-GPU features: offload modes, block streaming, tiled decode, the step cache.

    python scripts/bench_memory.py ssim                 # the step cache on zflux's small trained models (CPU is fine)
    python scripts/bench_memory.py zimage-offload       # GPU: Z-Image-Turbo peaks and prompt times per offload mode
    python scripts/bench_memory.py flux-blocks          # GPU: FLUX.1-dev denoising with streamed blocks vs the copy bound
    python scripts/bench_memory.py flux-cache           # GPU: FLUX.1-dev 28 steps, cache speed-up and latent error, and
                                                        #   the small trained model's skip schedule replayed at full size
    python scripts/bench_memory.py decode-2048          # GPU: 2048 x 2048 decode peak, whole and tiled, transformer offloaded

GPU rows use random bf16 weights at the real sizes (scripts/bench.py's random_model), 1024 x 1024
unless said, and print markdown tables. Peaks are torch.cuda.max_memory_allocated over the stage,
times CUDA-synchronized wall clock. The SSIM row runs the shipped small models (zimg/embedded,
flux/embedded) at 28 steps, each cached run against the uncached one of the same seed.
"""

import argparse
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench import random_model

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)
CACHE_THRESHOLD = 0.3  # chosen once by `ssim` (bench/RESULTS.md): SSIM >= 0.9 on both small models, the fewest steps computed
SMALL = {"zimg/embedded (z-image-turbo shape, CFG 4)": 4.0, "flux/embedded (flux-dev shape)": None}  # model -> its guidance
SMALL_PROMPTS = ("a red circle on a blue background", "a green square and a yellow triangle")  # one seed each: 0, 1
DEVICE, DTYPE = "cuda", torch.bfloat16
PROMPTS = ("a red fox in the snow", "a blue house by a lake")


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, seconds, peak GiB allocated during the call)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextmanager
def recorded() -> Iterator[list]:
    """Every StepCache made meanwhile, in order, each with `decisions`: its skip decision per call (True = skipped)."""
    from zflux.common.step_cache import StepCache

    made = []
    init, similar = StepCache.__init__, StepCache.similar

    def record_init(self, threshold: float) -> None:
        init(self, threshold)
        self.decisions = []
        made.append(self)

    def record_similar(self, residual: torch.Tensor) -> bool:
        self.decisions.append(similar(self, residual))
        return self.decisions[-1]

    StepCache.__init__, StepCache.similar = record_init, record_similar
    try:
        yield made
    finally:
        StepCache.__init__, StepCache.similar = init, similar


def small_pipeline(name: str, device: str):
    """A shipped small trained model (SMALL's name), in fp32."""
    from zflux.flux.pipeline import FluxPipeline
    from zflux.zimg.pipeline import ZImagePipeline

    cls = ZImagePipeline if name.startswith("zimg") else FluxPipeline
    return cls.from_pretrained(ROOT / name.split(" ")[0], device=device, dtype=torch.float32)


def small_run(pipe, guidance: float | None, seed: int, threshold: float | None) -> tuple[np.ndarray, float, list[bool]]:
    """(image, seconds, skip decision per call) of SMALL_PROMPTS[seed] at 128 x 128, 28 steps, with the cache at `threshold`."""
    with recorded() as made:
        start = time.perf_counter()
        image = np.asarray(pipe.generate(SMALL_PROMPTS[seed], height=128, width=128, steps=28, seed=seed, progress=False,
                                         guidance=guidance, cache=threshold))
        took = time.perf_counter() - start
    return image, took, made[0].decisions if made else [False] * 28


def ssim_table(args: argparse.Namespace) -> None:
    """The cache's quality on the trained small models: SSIM and PSNR of the image against the uncached one, per threshold;
    then the threshold that keeps SSIM >= 0.9 on both with the fewest steps computed."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print("| model | threshold | steps computed / 28 | time | SSIM | PSNR (dB) |\n|---|---|---|---|---|---|")
    fit = dict.fromkeys(THRESHOLDS, True)
    computed = dict.fromkeys(THRESHOLDS, 0.0)
    for name in SMALL:
        pipe = small_pipeline(name, device)
        runs = {threshold: [small_run(pipe, SMALL[name], seed, threshold) for seed in range(len(SMALL_PROMPTS))]
                for threshold in (None, *THRESHOLDS)}
        for threshold in THRESHOLDS:
            pairs = list(zip(runs[threshold], runs[None]))
            ssim = np.mean([structural_similarity(img, ref, channel_axis=2) for (img, *_), (ref, *_) in pairs])
            psnr = np.mean([peak_signal_noise_ratio(ref, img) for (img, *_), (ref, *_) in pairs])
            speed = np.mean([r[1] for r in runs[None]]) / np.mean([r[1] for r in runs[threshold]])
            steps = np.mean([len(d) - sum(d) for *_, d in runs[threshold]])
            fit[threshold] &= bool(ssim >= 0.9)
            computed[threshold] += steps
            print(f"| {name} | {threshold} | {steps:.1f} | {speed:.2f}x | {ssim:.3f} | {psnr:.1f} |")
    chosen = min((t for t in THRESHOLDS if fit[t]), key=lambda t: computed[t], default=None)
    print(f"SSIM >= 0.9 on both with the fewest steps computed: threshold {chosen} (CACHE_THRESHOLD is {CACHE_THRESHOLD})")


def zimage_pipeline(mode: str):
    """Z-Image-Turbo with random weights: the 6 B transformer, the FLUX autoencoder, a Qwen3-4B encoder (the tests' tokenizer)."""
    import sys

    from zflux.common.vae import PRESETS as VAE_PRESETS
    from zflux.common.vae import Autoencoder
    from zflux.zimg.model import PRESETS, ZImageTransformer
    from zflux.zimg.pipeline import ZImagePipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from test_offload_gpu import qwen3_4b

    transformer = random_model(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    vae = random_model(lambda: Autoencoder(VAE_PRESETS["flux"]))
    return ZImagePipeline(transformer, vae, qwen3_4b(), "z-image-turbo", offload=mode, device=DEVICE)


def zimage_offload(args: argparse.Namespace) -> None:
    """Z-Image-Turbo end to end at 1024 x 1024, 8 steps, per mode: peaks, and the times of a first, a repeated and a new
    prompt; a new prompt's extra time (new - same) against the copy bound of its encoder trip (the encoder's bytes over
    the host-to-device bandwidth), a repeated prompt's time against no offload's."""
    bandwidth = h2d_bandwidth()
    print(f"H2D from pinned memory: {bandwidth / 2**30:.1f} GiB/s")
    print("| mode | peak allocated (GiB) | peak reserved (GiB) | first prompt (s) | same prompt again (s) | vs none | new prompt (s) "
          "| new - same (s) | encoder copy bound (s) |\n|---|---|---|---|---|---|---|---|---|")
    none_again = None
    for mode in args.modes or ("none", "text-encoder", "model", "blocks"):
        pipe = zimage_pipeline(mode)
        run = dict(height=1024, width=1024, seed=0, progress=False)
        times, allocated, reserved = [], [], []
        for prompt in (PROMPTS[0], PROMPTS[0], PROMPTS[1]):
            _, took, peak = timed(lambda: pipe.generate(prompt, **run))
            times.append(took)
            allocated.append(peak)
            reserved.append(torch.cuda.max_memory_reserved() / 2**30)
        first, again, new = times
        none_again = again if mode == "none" else none_again
        encoder_bytes = sum(p.numel() * p.element_size() for p in pipe.text_encoder.model.parameters())
        bound = "" if mode == "none" else f"{encoder_bytes / bandwidth:.2f}"
        versus = f"{again / none_again:.2f}x" if none_again else ""
        print(f"| {mode} | {max(allocated):.1f} | {max(reserved):.1f} | {first:.2f} | {again:.2f} | {versus} | {new:.2f} "
              f"| {new - again:.2f} | {bound} |")
        # A streamed mode's hooks and the blocks they stream hold each other: only the collector frees them, and until it
        # does their memory stays reserved into the next mode's row.
        del pipe
        gc.collect()
        torch.cuda.empty_cache()


def h2d_bandwidth(nbytes: int = 2**30) -> float:
    """Host-to-device bytes per second from pinned memory (the median of 5 copies of `nbytes`)."""
    host, dev = torch.empty(nbytes, dtype=torch.uint8).pin_memory(), torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    times = []
    for _ in range(6):
        _, took, _ = timed(lambda: dev.copy_(host, non_blocking=True))
        times.append(took)
    return nbytes / sorted(times[1:])[2]


def flux_transformer():
    from zflux.flux.model import PRESETS, Flux

    return random_model(lambda: Flux(PRESETS["flux-dev"]))


def flux_predict(transformer, steps: int):
    """FLUX.1-dev's predict closure and start tokens at 1024 x 1024, random 512-token text (no text encoder)."""
    from zflux.common.sampling import SchedulerConfig
    from zflux.flux.pipeline import VARIANTS, predictor

    scheduler: SchedulerConfig = VARIANTS["flux-dev"].scheduler
    sigmas = scheduler.schedule(steps, 4096)
    gen = torch.Generator(DEVICE).manual_seed(0)
    features = torch.randn(1, 512, 4096, device=DEVICE, dtype=DTYPE, generator=gen)
    pooled = torch.randn(1, 768, device=DEVICE, dtype=DTYPE, generator=gen)
    predict = predictor(transformer, features=features, pooled=pooled, size=(128, 128), sigmas=sigmas, guidance=3.5, true_cfg=1.0,
                        device=torch.device(DEVICE))
    return predict, torch.randn(1, 4096, 64, device=DEVICE, dtype=DTYPE, generator=gen), sigmas


def flux_blocks(args: argparse.Namespace) -> None:
    """FLUX.1-dev denoising with the blocks streamed: peak and time per step against the copy bound."""
    from zflux.common.offload import Offload, repeated_blocks
    from zflux.common.pipeline import denoise

    bandwidth = h2d_bandwidth()
    transformer = flux_transformer()
    block_bytes = sum(p.numel() * p.element_size() for b in repeated_blocks(transformer) for p in b.parameters())
    predict, tokens, sigmas = flux_predict(transformer, steps=args.steps)
    resident, t_resident, peak_resident = timed(lambda: denoise(predict, tokens, sigmas, 0, progress=False))
    off = Offload("blocks", {"transformer": transformer}, torch.device(DEVICE))
    torch.cuda.empty_cache()
    with off.stage("denoise"):
        streamed, t_streamed, peak_streamed = timed(lambda: denoise(predict, tokens, sigmas, 0, progress=False))
    bound = block_bytes / bandwidth
    print(f"H2D from pinned memory: {bandwidth / 2**30:.1f} GiB/s; the blocks: {block_bytes / 2**30:.1f} GiB, copy bound "
          f"{bound * 1000:.0f} ms per step")
    print("| FLUX.1-dev 1024x1024 denoising | peak (GiB) | per step (ms) | vs copy bound |\n|---|---|---|---|")
    print(f"| resident | {peak_resident:.1f} | {t_resident / args.steps * 1000:.0f} | |")
    print(f"| --offload blocks | {peak_streamed:.1f} | {t_streamed / args.steps * 1000:.0f} | {t_streamed / args.steps / bound:.2f}x |")
    print(f"streamed output equals resident: {torch.equal(streamed, resident)}")


def flux_cache(args: argparse.Namespace) -> None:
    """FLUX.1-dev, 28 steps at 1024 x 1024: the cache's speed-up and the final latents' relative error, per threshold (random
    weights: their first block's residual changes too much to skip), then replaying the schedule of steps computed and
    skipped that the small trained FLUX.1-shaped model chooses at CACHE_THRESHOLD (recorded here, first)."""
    from zflux.common.pipeline import denoise
    from zflux.common.step_cache import StepCache, step_cache

    class Replayed(StepCache):
        """A step cache whose skip decisions are given, one per call, instead of measured."""

        def __init__(self, schedule: list[bool]):
            super().__init__(threshold=0.0)
            self.schedule = schedule

        def similar(self, residual: torch.Tensor) -> bool:
            return self.schedule[self.computed + self.skipped]

    name = next(name for name in SMALL if name.startswith("flux"))
    *_, schedule = small_run(small_pipeline(name, DEVICE), SMALL[name], seed=0, threshold=CACHE_THRESHOLD)
    print(f"{name} at threshold {CACHE_THRESHOLD}: {len(schedule) - sum(schedule)} of 28 steps computed, "
          f"{''.join('-' if skip else 'C' for skip in schedule)} (C computed, - skipped)")
    transformer = flux_transformer()
    predict, tokens, sigmas = flux_predict(transformer, steps=28)
    denoise(predict, tokens, sigmas, 26, progress=False)  # warm-up
    plain, t_plain, _ = timed(lambda: denoise(predict, tokens, sigmas, 0, progress=False))
    print("| threshold | steps computed / 28 | time (s) | speed-up | final latent rel. error |\n|---|---|---|---|---|")
    print(f"| off | 28 | {t_plain:.2f} | 1.00x | 0 |")
    for threshold in (0.0, *THRESHOLDS):
        with step_cache(transformer, threshold) as cache:
            out, took, _ = timed(lambda: denoise(predict, tokens, sigmas, 0, progress=False))
        print(f"| {threshold} | {cache.computed} | {took:.2f} | {t_plain / took:.2f}x | {rel_err(out, plain):.4f} |")
    transformer.step_cache = replay = Replayed(schedule)
    try:
        out, took, _ = timed(lambda: denoise(predict, tokens, sigmas, 0, progress=False))
    finally:
        transformer.step_cache = None
    print(f"| {CACHE_THRESHOLD}, the small model's schedule replayed | {replay.computed} | {took:.2f} | {t_plain / took:.2f}x "
          f"| {rel_err(out, plain):.4f} |")


def decode_2048(args: argparse.Namespace) -> None:
    """A 2048 x 2048 Z-Image-Turbo decode, the transformer offloaded (model mode's decode stage): whole and tiled."""
    from zflux.common.offload import Offload
    from zflux.common.pipeline import decode_latents
    from zflux.common.vae import PRESETS as VAE_PRESETS
    from zflux.common.vae import Autoencoder
    from zflux.zimg.model import PRESETS, ZImageTransformer

    transformer = random_model(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    vae = random_model(lambda: Autoencoder(VAE_PRESETS["flux"]))
    off = Offload("model", {"transformer": transformer, "vae": vae}, torch.device(DEVICE))
    latents = torch.randn(1, 16, 256, 256, device=DEVICE)
    print("| 2048x2048 decode, transformer offloaded | peak (GiB) | time (s) |\n|---|---|---|")
    with off.stage("decode"):
        for tiling in (False, True):
            try:
                _, took, peak = timed(lambda: decode_latents(vae, latents, tiling))
                print(f"| {'tiled (512 px tiles, 128 px overlap)' if tiling else 'whole'} | {peak:.1f} | {took:.2f} |")
            except torch.cuda.OutOfMemoryError:
                print(f"| {'tiled' if tiling else 'whole'} | out of memory | |")
            torch.cuda.empty_cache()


SECTIONS = {"ssim": ssim_table, "zimage-offload": zimage_offload, "flux-blocks": flux_blocks, "flux-cache": flux_cache,
            "decode-2048": decode_2048}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="+", choices=SECTIONS)
    parser.add_argument("--device", help="ssim: where to run the small models (default: cuda if there, else cpu)")
    parser.add_argument("--modes", nargs="+", help="zimage-offload: the modes to run (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="flux-blocks: denoising steps to time (default 4)")
    args = parser.parse_args()
    with torch.inference_mode():
        for section in args.sections:
            SECTIONS[section](args)


if __name__ == "__main__":
    main()
