"""The FLUX autoencoder at full size on the GPU: bf16 accuracy and decode memory, compared with diffusers.

Random weights at the real shape; decode a 128x128 latent to 1024x1024 and encode a 1024x1024 image.
The accuracy bar: our bf16 error against diffusers' fp32 output is at most 1.25x diffusers' own bf16
error on the same inputs (the same convolutions and norms run in bf16; only rounding order can
differ). The memory bar: the peak of torch.cuda.max_memory_allocated above the starting point during
our decode is no higher than during diffusers' decode (same weights, same input, nothing tiled).
"""

import time

import pytest
import torch

from zflux.common.vae import PRESETS, AutoencoderConfig
from test_vae import FOUR_LEVELS, diffusers_vae, ours_from
from util import rel_err


def _peak_bytes(fn) -> int:
    """Peak CUDA memory allocated while `fn` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def bf16_report(cfg: AutoencoderConfig, latent_size: int, device: str, std: float) -> dict:
    """bf16 errors against diffusers' fp32 output (encode and decode), and on CUDA decode peak memory and time."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.device(device):
        ref = diffusers_vae(cfg, std=std)
    g = torch.Generator(device).manual_seed(1)
    size = latent_size * cfg.downscale
    latent = torch.randn(1, cfg.latent_channels, latent_size, latent_size, generator=g, device=device)
    image = torch.rand(1, 3, size, size, generator=g, device=device) * 2 - 1
    with torch.no_grad():
        want_image, want_mean = ref.decode(latent).sample, ref.encode(image).latent_dist.mean
        ref = ref.to(torch.bfloat16)  # in place: the fp32 weights are gone from here on
        ours = ours_from(ref, cfg)  # shares the bf16 weights
        latent, image = latent.bfloat16(), image.bfloat16()
        run_ref, run_ours = (lambda: ref.decode(latent).sample), (lambda: ours.decode(latent))
        report = {
            "decode_err_diffusers": rel_err(run_ref(), want_image), "decode_err_ours": rel_err(run_ours(), want_image),
            "encode_err_diffusers": rel_err(ref.encode(image).latent_dist.mean, want_mean),
            "encode_err_ours": rel_err(ours.encode(image), want_mean),
        }
        if device == "cuda":
            report |= {"peak_diffusers": _peak_bytes(run_ref), "peak_ours": _peak_bytes(run_ours),
                       "ms_diffusers": _median_ms(run_ref), "ms_ours": _median_ms(run_ours)}
    return report


def _check(report: dict, slack: float) -> None:
    for what in ("decode", "encode"):
        assert report[f"{what}_err_ours"] <= 1.25 * report[f"{what}_err_diffusers"] + slack, report
    if "peak_ours" in report:
        assert report["peak_ours"] <= report["peak_diffusers"], report


def test_bf16_tiny_cpu():
    """The GPU test's code path, at a tiny size on the CPU (errors only: no CUDA memory counters here)."""
    _check(bf16_report(FOUR_LEVELS, 6, "cpu", std=0.1), slack=1e-3)


@pytest.mark.gpu
def test_bf16_full_size():
    r = bf16_report(PRESETS["flux"], 128, "cuda", std=0.02)
    print(f"\nFLUX VAE bf16 vs fp32, 1024x1024: decode diffusers {r['decode_err_diffusers']:.3e}, zflux {r['decode_err_ours']:.3e}; "
          f"encode diffusers {r['encode_err_diffusers']:.3e}, zflux {r['encode_err_ours']:.3e}")
    print(f"decode peak memory: diffusers {r['peak_diffusers'] / 2**20:.0f} MiB, zflux {r['peak_ours'] / 2**20:.0f} MiB; "
          f"time: diffusers {r['ms_diffusers']:.1f} ms, zflux {r['ms_ours']:.1f} ms")
    _check(r, slack=0.0)
