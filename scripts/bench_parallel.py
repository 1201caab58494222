"""Time one image on 1, 2 and 4 GPUs with sequence parallelism (common/parallel.py), and print the speed-ups.

    python scripts/bench_parallel.py                                   # every model, 1024 and 2048, 1/2/4 GPUs
    python scripts/bench_parallel.py --models flux-dev --sizes 1024 --gpus 1 2 --steps 4

The driver launches `torchrun --nproc-per-node N` of this script for each N (--worker), which
builds each transformer and its autoencoder at their real sizes with random bf16 weights in GPU
memory (the same on every rank: one seed), and times one image: the family's predict closure over
every step through common.pipeline.denoise, `--parallel sp` as the CLI runs it, then the
autoencoder's decode (which runs whole on every rank). The text features are random: the prompt
encoder, run once per prompt and whole on every rank, is not timed. The timed span is from a
barrier to the last rank's end, after one warm-up step and decode.
Rank 0 prints one JSON line per run; the driver prints a markdown table with the speed-up over 1 GPU.
A model that does not fit on one GPU (FLUX.2 [dev] at bf16 on 80 GB) is reported as out of memory.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch

from bench import random_model

MODELS = ("z-image-turbo", "flux-dev", "flux2-dev")
TEXT_TOKENS = {"z-image-turbo": 128, "flux-dev": 512, "flux2-dev": 512}  # Z-Image keeps a caption's real tokens only


def predictor(name: str, height: int, width: int, steps: int, device: torch.device) -> Callable:
    """predict(latents, i) for one image of `name` at height x width, as the pipeline builds it; and its start latents."""
    from zflux.common.sampling import sigma_schedule

    sigmas = sigma_schedule(steps)
    g = torch.Generator(device).manual_seed(1)
    text = lambda width_: torch.randn(1, TEXT_TOKENS[name], width_, device=device, generator=g, dtype=torch.bfloat16)  # noqa: E731
    if name == "z-image-turbo":
        from zflux.zimg.model import PRESETS, ZImageTransformer
        from zflux.zimg.pipeline import VARIANTS, predictor as zimage_predictor

        cfg = PRESETS[name]
        model = random_model(lambda: ZImageTransformer(cfg))
        predict = zimage_predictor(model, features=text(cfg.cap_feat_dim), mask=torch.ones(1, TEXT_TOKENS[name], dtype=torch.bool, device=device),
                                   sigmas=sigmas, settings=VARIANTS[name].defaults, device=device)
        latents = torch.randn(1, cfg.in_channels, height // 8, width // 8, device=device, generator=g)
    elif name == "flux-dev":
        from zflux.flux.model import PRESETS, Flux
        from zflux.flux.pipeline import predictor as flux_predictor

        cfg = PRESETS[name]
        model = random_model(lambda: Flux(cfg))
        predict = flux_predictor(model, features=text(cfg.joint_attention_dim), pooled=text(cfg.pooled_projection_dim)[:, 0],
                                 size=(height // 8, width // 8), sigmas=sigmas, guidance=3.5, true_cfg=1.0, device=device)
        latents = torch.randn(1, (height // 16) * (width // 16), cfg.in_channels, device=device, generator=g)
    else:
        from zflux.flux.flux2.model import PRESETS, Flux2
        from zflux.flux.flux2.pipeline import predictor as flux2_predictor

        cfg = PRESETS[name]
        model = random_model(lambda: Flux2(cfg))
        predict = flux2_predictor(model, text=text(cfg.joint_attention_dim), size=(height // 16, width // 16), sigmas=sigmas,
                                  guidance=4.0, refs=None, kv=False, device=device)
        latents = torch.randn(1, (height // 16) * (width // 16), cfg.in_channels, device=device, generator=g)
    return predict, latents, sigmas, model


def synchronized(plan) -> float:
    """The time once every rank's GPU has finished its queued work."""
    import torch.distributed as dist

    torch.cuda.synchronize()
    if plan.world > 1:
        dist.barrier()
    return time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: every model and size, rank 0 printing a JSON line each."""
    from zflux.common import parallel
    from zflux.common.pipeline import denoise
    from zflux.common.vae import PRESETS, Autoencoder

    autoencoders = {"z-image-turbo": PRESETS["flux"], "flux-dev": PRESETS["flux"], "flux2-dev": PRESETS["flux2"]}

    device = parallel.rank_device(torch.device("cuda"))
    with parallel.session("sp" if parallel.launched()[1] > 1 else None, device) as plan:
        for name in args.models:
            for size in args.sizes:
                torch.manual_seed(0)  # the same random weights on every rank
                row = dict(model=name, size=size, gpus=plan.world, steps=args.steps)
                try:
                    predict, latents, sigmas, model = predictor(name, size, size, args.steps, device)
                    vae = random_model(lambda: Autoencoder(autoencoders[name]))
                    raw = torch.randn(1, vae.cfg.latent_channels, size // 8, size // 8, device=device)  # what decoding costs
                    with torch.inference_mode(), plan.applied(model):
                        denoise(predict, latents, sigmas[-2:], 0, progress=False)  # warm-up: one step, one decode
                        vae.decode(raw)
                        start = synchronized(plan)
                        denoise(predict, latents, sigmas, 0, progress=False)
                        loop = synchronized(plan)
                        vae.decode(raw)
                        end = synchronized(plan)
                    row |= dict(seconds=end - start, loop=loop - start, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
                    del predict, model, vae
                except torch.cuda.OutOfMemoryError:
                    row["seconds"] = None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                if plan.rank == 0:
                    print(json.dumps(row), flush=True)


def drive(args: argparse.Namespace) -> None:
    """Launch the workers for each GPU count and print the table."""
    rows = []
    for gpus in args.gpus:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__, "--worker",
                   "--models", *args.models, "--sizes", *map(str, args.sizes), "--steps", str(args.steps)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode:
            print(f"torchrun with {gpus} GPU(s) exited with {done.returncode}", file=sys.stderr)
    one = {(r["model"], r["size"]): r["seconds"] for r in rows if r["gpus"] == 1}
    print(f"\n{torch.cuda.get_device_name(0)}, bf16, sequence parallel (Ulysses), {args.steps} steps, one image\n")
    print("| model | size | GPUs | seconds (loop + decode) | loop s/step | speed-up | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["size"], r["gpus"])):
        if r["seconds"] is None:
            print(f"| {r['model']} | {r['size']} | {r['gpus']} | out of memory | | | |")
            continue
        base = one.get((r["model"], r["size"]))
        speedup = f"{base / r['seconds']:.2f}x" if base else "n/a"
        print(f"| {r['model']} | {r['size']} | {r['gpus']} | {r['seconds']:.2f} | {r['loop'] / r['steps']:.3f} | {speedup} "
              f"| {r['peak_gib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="square image sizes in pixels")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4], help="GPU counts (each at most the machine's)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps timed (speed-ups are per step: a few suffice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
