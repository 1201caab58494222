"""Time zflux against diffusers, side by side in one process, on the same inputs and weights.

    python scripts/bench.py                      # every model, eager
    python scripts/bench.py --models zimage --compile --backend triton

Random weights at the real sizes, bf16, batch 1, 1024x1024 (128x128 latent). Each row is one
forward (one NFE) or one VAE decode: CUDA-event median over --iters runs after --warmup runs, the
peak memory the call adds, and ours/diffusers ratios. Prints a markdown table.
"""

import argparse
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

DEVICE, DTYPE = "cuda", torch.bfloat16


@dataclass
class Case:
    name: str
    theirs: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor]


def time_ms(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds per call and the peak memory (GiB) one call adds on top of what is resident."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def random_init_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights (norm scales around 1) without a CPU round trip."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, std)
    return model.eval().requires_grad_(False)


def compile_blocks(blocks: torch.nn.ModuleList) -> None:
    """Compile each repeated block in place, as diffusers' compile_repeated_blocks does."""
    for block in blocks:
        block.compile(fullgraph=True)


def zimage_case(args: argparse.Namespace) -> Case:
    from diffusers import ZImageTransformer2DModel

    from zimg.convert import from_diffusers
    from zimg.model import PRESETS, ZImageTransformer

    cfg = PRESETS["z-image-turbo"]
    with torch.device(DEVICE):
        ref = random_init_(ZImageTransformer2DModel(axes_lens=list(cfg.axes_lens)).to(DTYPE))
        ours = ZImageTransformer(cfg, backend=args.backend).to(DTYPE)
    ours.load_state_dict(from_diffusers(ref.state_dict()))
    if args.compile:
        ref.compile_repeated_blocks(fullgraph=True)
        for blocks in (ours.noise_refiner, ours.context_refiner, ours.layers):
            compile_blocks(blocks)
    x = torch.randn(1, 16, 128, 128, device=DEVICE, dtype=DTYPE)
    cap = torch.randn(1, 128, cfg.cap_feat_dim, device=DEVICE, dtype=DTYPE)
    t = torch.tensor([0.5], device=DEVICE)
    return Case("Z-Image transformer (4096 img + 128 caption tokens)",
                lambda: ref([x[0, :, None]], t, [cap[0]], return_dict=False)[0][0], lambda: ours(x, t, cap))


CASES = {"zimage": zimage_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--backend", choices=("sdpa", "triton"), default="sdpa", help="zflux backend")
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks of both")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backend {args.backend}, compile {args.compile}\n")
    print("| what | diffusers ms | zflux ms | speed-up | diffusers peak GiB | zflux peak GiB |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        case = CASES[name](args)
        t_ref, m_ref = time_ms(case.theirs, args.warmup, args.iters)
        t_ours, m_ours = time_ms(case.ours, args.warmup, args.iters)
        print(f"| {case.name} | {t_ref:.1f} | {t_ours:.1f} | {t_ref / t_ours:.2f}x | {m_ref:.2f} | {m_ours:.2f} |", flush=True)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
