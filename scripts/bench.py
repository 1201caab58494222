"""Time zflux against diffusers, side by side in one process, on the same inputs and weights.

    python scripts/bench.py                      # every model, eager
    python scripts/bench.py --models zimage --compile --backend triton
    python scripts/bench.py --models zimage-controlnet   # Z-Image-Turbo + ControlNet Union 2.1

Random weights at the real sizes, bf16, batch 1, 1024x1024 (128x128 latent). Each row is one
forward (one NFE) or one VAE decode: CUDA-event median over --iters runs after --warmup runs, the
peak memory the call adds, and ours/diffusers ratios. Prints a markdown table. A case with a plain
counterpart (the ControlNet: the same step without it) adds a row for the difference, the extra cost per step.
"""

import argparse
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from zflux.common.weights import build_on_meta, load_into

DEVICE, DTYPE = "cuda", torch.bfloat16


@dataclass
class Case:
    name: str
    theirs: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor]
    plain: "Case | None" = None  # the same work without the addition this case measures


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


def random_model(factory: Callable[[], torch.nn.Module], std: float = 0.02) -> torch.nn.Module:
    """Build on meta, allocate straight into bf16 on the GPU, fill with random weights (norm scales ~1)."""
    model = build_on_meta(factory).to(DTYPE).to_empty(device=DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, std)
    return model.eval().requires_grad_(False)


def compile_blocks(blocks: torch.nn.ModuleList) -> None:
    """Compile each repeated block in place, as diffusers' compile_repeated_blocks does."""
    for block in blocks:
        block.compile(fullgraph=True)


def zimage_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' Z-Image-Turbo transformer and ours with the same random weights (compiled with --compile)."""
    from diffusers import ZImageTransformer2DModel

    from zflux.zimg.convert import from_diffusers
    from zflux.zimg.model import PRESETS, ZImageTransformer

    cfg = PRESETS["z-image-turbo"]
    ref = random_model(lambda: ZImageTransformer2DModel(axes_lens=list(cfg.axes_lens)))
    ours = load_into(build_on_meta(lambda: ZImageTransformer(cfg, backend=args.backend)), from_diffusers(ref.state_dict()))
    if args.compile:
        ref.compile_repeated_blocks(fullgraph=True)
        for blocks in (ours.noise_refiner, ours.context_refiner, ours.layers):
            compile_blocks(blocks)
    return ref, ours


def zimage_case(args: argparse.Namespace, cap_lens: tuple[int, ...] = (128,)) -> Case:
    ref, ours = zimage_models(args)
    cfg = ours.cfg
    B, L = len(cap_lens), max(cap_lens)
    x = torch.randn(B, 16, 128, 128, device=DEVICE, dtype=DTYPE)
    cap = torch.randn(B, L, cfg.cap_feat_dim, device=DEVICE, dtype=DTYPE)
    mask = torch.arange(L, device=DEVICE) < torch.tensor(cap_lens, device=DEVICE)[:, None]  # (B, L)
    t = torch.full((B,), 0.5, device=DEVICE)
    ref_caps = [c[:n] for c, n in zip(cap, cap_lens)]
    what = "Z-Image transformer (4096 img + 128 caption tokens)" if B == 1 else \
        f"Z-Image CFG batch {B} (captions {' and '.join(map(str, cap_lens))} tokens)"
    return Case(what, lambda: ref(list(x[:, :, None]), t, ref_caps, return_dict=False)[0][0],
                lambda: ours(x, t, cap, None if B == 1 else mask))


def flux_case(args: argparse.Namespace) -> Case:
    from diffusers import FluxTransformer2DModel

    from zflux.flux.convert import from_diffusers
    from zflux.flux.model import PRESETS, Flux
    from zflux.flux.pipeline import img_ids, txt_ids

    cfg = PRESETS["flux-dev"]
    ref = random_model(lambda: FluxTransformer2DModel(guidance_embeds=True))
    ours = load_into(build_on_meta(lambda: Flux(cfg, backend=args.backend)), from_diffusers(ref.state_dict()))
    if args.compile:
        ref.compile_repeated_blocks(fullgraph=True)
        for blocks in (ours.double_blocks, ours.single_blocks):
            compile_blocks(blocks)
    img = torch.randn(1, 4096, 64, device=DEVICE, dtype=DTYPE)
    txt = torch.randn(1, 512, 4096, device=DEVICE, dtype=DTYPE)
    y = torch.randn(1, 768, device=DEVICE, dtype=DTYPE)
    t, guidance = torch.tensor([0.5], device=DEVICE), torch.tensor([3.5], device=DEVICE)
    i_ids, t_ids = img_ids(1, 64, 64, DEVICE), txt_ids(1, 512, DEVICE)
    return Case("FLUX.1-dev transformer (4096 img + 512 text tokens)",
                lambda: ref(img, txt, y, t, i_ids[0], t_ids[0], guidance, return_dict=False)[0],
                lambda: ours(img, i_ids, txt, t_ids, t, y, guidance))


def vae_case(args: argparse.Namespace) -> Case:
    from diffusers import AutoencoderKL

    from zflux.common.vae import PRESETS, Autoencoder, from_diffusers

    cfg = PRESETS["flux"]
    n = len(cfg.block_out_channels)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
    ref = random_model(lambda: AutoencoderKL(**kwargs, down_block_types=["DownEncoderBlock2D"] * n,
                                             up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv=False,
                                             use_post_quant_conv=False))
    ours = load_into(build_on_meta(lambda: Autoencoder(cfg)), from_diffusers(ref.state_dict()))
    z = torch.randn(1, cfg.latent_channels, 128, 128, device=DEVICE, dtype=DTYPE)
    return Case("VAE decode 1024x1024", lambda: ref.decode(z).sample, lambda: ours.decode(z))


def zimage_controlnet_case(args: argparse.Namespace) -> Case:
    """Z-Image-Turbo steered by ControlNet Union 2.1 (15 control blocks + 2 refiner control blocks), scale 0.75.

    With --compile only the base transformers are compiled; both ControlNets stay eager.
    """
    from diffusers import ZImageControlNetModel

    from zflux.zimg.controlnet import PRESETS, ZImageControlNet
    from zflux.zimg.convert import controlnet_from_diffusers

    cfg = PRESETS["z-image-turbo-controlnet-2.1"]
    ref_base, base = zimage_models(args)
    ref = random_model(lambda: ZImageControlNetModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}))
    ours = load_into(build_on_meta(lambda: ZImageControlNet(cfg)), controlnet_from_diffusers(ref.state_dict()))
    ref = ZImageControlNetModel.from_transformer(ref, ref_base)
    x = torch.randn(1, 16, 128, 128, device=DEVICE, dtype=DTYPE)
    control = torch.randn(1, 33, 128, 128, device=DEVICE, dtype=DTYPE)
    cap = torch.randn(1, 128, base.cfg.cap_feat_dim, device=DEVICE, dtype=DTYPE)
    t = torch.full((1,), 0.5, device=DEVICE)

    def theirs(controlled: bool) -> torch.Tensor:
        hints = ref(list(x[:, :, None]), t, list(cap), list(control[:, :, None]), conditioning_scale=0.75) if controlled else None
        return ref_base(list(x[:, :, None]), t, list(cap), controlnet_block_samples=hints, return_dict=False)[0][0]

    return Case("Z-Image-Turbo + ControlNet Union 2.1 (4096 img + 128 caption tokens)", partial(theirs, True),
                lambda: base(x, t, cap, control=ours.bind(base, control, scale=0.75)),
                plain=Case("Z-Image-Turbo alone", partial(theirs, False), lambda: base(x, t, cap)))


CASES = {"zimage": zimage_case, "zimage-cfg": lambda args: zimage_case(args, (128, 90)), "zimage-controlnet": zimage_controlnet_case,
         "flux": flux_case, "vae": vae_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--backend", choices=("auto", "sdpa", "triton"), default="auto", help="zflux backend")
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
        if case.plain is not None:
            extra_ref = t_ref - time_ms(case.plain.theirs, args.warmup, args.iters)[0]
            extra_ours = t_ours - time_ms(case.plain.ours, args.warmup, args.iters)[0]
            print(f"| {case.name.split(' (')[0]}: extra per step over {case.plain.name} | {extra_ref:.1f} | {extra_ours:.1f} | "
                  f"{extra_ref / extra_ours:.2f}x | | |", flush=True)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
