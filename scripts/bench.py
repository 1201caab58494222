"""Time zflux against diffusers, side by side in one process, on the same inputs and weights.

    python scripts/bench.py                      # every model, eager
    python scripts/bench.py --models zimage --compile --backend triton
    python scripts/bench.py --models zimage-controlnet   # Z-Image-Turbo + ControlNet Union 2.1
    python scripts/bench.py --models flux2-klein-4b flux2-klein-9b flux2-dev flux2-klein-4b-pipeline
    python scripts/bench.py --models zimage zimage-fp8 flux flux-fp8 flux2-klein-4b flux2-klein-4b-fp8
    python scripts/bench.py --models vae vae-flux2 qwen3-encode      # decode and prompt encode (--compile: the encoder too)
    python scripts/bench.py --models flux2-klein-9b --profile   # where the time of one call goes, and its floor

Random weights at the real sizes, bf16, batch 1, 1024x1024 (128x128 latent). Each row is one
forward (one NFE), one VAE decode or one whole generate() call (the pipeline row): CUDA-event
median over --iters runs after --warmup runs, the peak memory the call adds, and ours/diffusers
ratios. Prints a markdown table. A case with a plain counterpart (the ControlNet: the same step
without it) adds a row for the difference, the extra cost per step. The `-fp8` rows time ours with
precision fp8 (common/fp8.py: fp8 GEMMs and the fp8 flash kernel; ZFLUX_FP8_ATTENTION=0 for bf16 attention)
against diffusers in bf16, beside the bf16 rows of the same model.

--profile adds, per implementation, one profiled call's GPU time by kind of kernel (GEMM, attention,
fused Triton norm/modulation, copies and elementwise, other) and the floor of the call: its linear
layers' FLOPs (counted by hooks) at the bf16 GEMM rate measured on a large matmul in the same run,
plus the attention FLOPs at the attention rate the profile shows.
"""

import argparse
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from zflux.common.fp8 import FP8Linear, apply_precision
from zflux.common.graphs import forward_of
from zflux.common.quant import Fp8Tensor
from zflux.common.weights import build_on_meta, load_into

DEVICE, DTYPE = "cuda", torch.bfloat16


@dataclass
class Case:
    name: str
    theirs: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor] | None = None
    plain: "Case | None" = None  # the same work without the addition this case measures
    # Where both models do not fit at once (FLUX.2 [dev]): builds ours from the reference's weights after the
    # reference is timed, releasing the reference, and returns ours' call.
    make_ours: Callable[[], Callable[[], torch.Tensor]] | None = None


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


KINDS = {  # kernel name fragments -> kind; the first match wins
    "attention": ("flash", "fmha", "sdpa", "attention", "attn"),
    "gemm": ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_"),
    "copies, elementwise (PyTorch)": ("at::native", "elementwise", "copy", "memcpy", "memset"),
    "fused norm/modulation (Triton)": ("triton", "_kernel"),
}


def kind_of(kernel: str) -> str:
    lowered = kernel.lower()
    return next((kind for kind, parts in KINDS.items() if any(p in lowered for p in parts)), "other")


def gemm_rate(n: int = 8192) -> float:
    """This GPU's bf16 GEMM rate (FLOP/s) on an n x n x n matmul."""
    a, b = torch.randn(n, n, device=DEVICE, dtype=DTYPE), torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    ms, _ = time_ms(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / (ms / 1e3)


def linear_flops(fn: Callable[[], torch.Tensor]) -> float:
    """FLOPs of every linear call one fn() makes, bf16 or fp8 (2 * rows * in * out), counted by forward hooks."""
    total = [0.0]

    def count(module: torch.nn.Module, inputs: tuple, _output) -> None:
        if isinstance(module, (torch.nn.Linear, FP8Linear)):
            x = inputs[0].data if isinstance(inputs[0], Fp8Tensor) else inputs[0]
            N, K = module.weight.shape
            total[0] += 2 * x.numel() // K * K * N

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            fn()
    finally:
        handle.remove()
    return total[0]


def profile(name: str, fn: Callable[[], torch.Tensor], rate: float) -> None:
    """One call of fn under the profiler: its GPU time by kind, the top kernels, and the GEMM floor."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    flops = linear_flops(fn)
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_device_time_total / 1e3
    total = sum(by_kind.values())
    floor = flops / rate * 1e3
    print(f"\n{name}: {total:.1f} ms of GPU kernels; linear layers {flops / 1e12:.1f} TFLOP = {floor:.1f} ms at "
          f"{rate / 1e12:.0f} TFLOP/s (GEMMs here ran at {flops / 1e12 / max(by_kind.get('gemm', 0.0), 1e-9) * 1e3:.0f})")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:20]:
        print(f"    {e.self_device_time_total / 1e3:8.2f} ms x{e.count:<4d} {kind_of(e.key):12.12s} {e.key[:90]}")


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


def zimage_models(args: argparse.Namespace, precision: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' Z-Image-Turbo transformer and ours with the same random weights (ours in `precision`; compiled with
    --compile)."""
    from diffusers import ZImageTransformer2DModel

    from zflux.zimg.convert import from_diffusers
    from zflux.zimg.model import PRESETS, ZImageTransformer

    cfg = PRESETS["z-image-turbo"]
    ref = random_model(lambda: ZImageTransformer2DModel(axes_lens=list(cfg.axes_lens)))
    ours = load_into(build_on_meta(lambda: ZImageTransformer(cfg, backend=args.backend)), from_diffusers(ref.state_dict()))
    ours = apply_precision(ours, precision)
    if args.compile:
        ref.compile_repeated_blocks(fullgraph=True)
        for blocks in (ours.noise_refiner, ours.context_refiner, ours.layers):
            compile_blocks(blocks)
    return ref, ours


def zimage_case(args: argparse.Namespace, cap_lens: tuple[int, ...] = (128,), precision: str | None = None) -> Case:
    ref, ours = zimage_models(args, precision)
    cfg = ours.cfg
    B, L = len(cap_lens), max(cap_lens)
    x = torch.randn(B, 16, 128, 128, device=DEVICE, dtype=DTYPE)
    cap = torch.randn(B, L, cfg.cap_feat_dim, device=DEVICE, dtype=DTYPE)
    mask = torch.arange(L, device=DEVICE) < torch.tensor(cap_lens, device=DEVICE)[:, None]  # (B, L)
    t = torch.full((B,), 0.5, device=DEVICE)
    ref_caps = [c[:n] for c, n in zip(cap, cap_lens)]
    what = "Z-Image transformer (4096 img + 128 caption tokens)" if B == 1 else \
        f"Z-Image CFG batch {B} (captions {' and '.join(map(str, cap_lens))} tokens)"
    return Case(what + (f", zflux {precision}" if precision else ""),
                lambda: ref(list(x[:, :, None]), t, ref_caps, return_dict=False)[0][0],
                lambda: forward_of(ours, args.graphs)(x, t, cap, None if B == 1 else mask))


def flux_case(args: argparse.Namespace, tool: str = "flux-dev", precision: str | None = None) -> Case:
    """One FLUX.1 forward at 1024x1024: dev, or a tool's input (Fill: 384 channels per token; Kontext: a 1024x1024
    reference's 4096 tokens after the image's, twice the image tokens); ours in `precision`."""
    from diffusers import FluxTransformer2DModel

    from zflux.flux.convert import from_diffusers
    from zflux.flux.model import PRESETS, Flux
    from zflux.flux.pipeline import img_ids, txt_ids
    from zflux.flux.tools import REFERENCE_INDEX

    cfg = PRESETS[tool]
    ref = random_model(lambda: FluxTransformer2DModel(in_channels=cfg.in_channels, out_channels=cfg.out_channels, guidance_embeds=True))
    ours = apply_precision(load_into(build_on_meta(lambda: Flux(cfg, backend=args.backend)), from_diffusers(ref.state_dict())),
                           precision)
    if args.compile:
        ref.compile_repeated_blocks(fullgraph=True)
        for blocks in (ours.double_blocks, ours.single_blocks):
            compile_blocks(blocks)
    reference = 64 if tool == "flux-kontext" else 0  # packed tokens per side of the reference
    img = torch.randn(1, 4096 + reference**2, cfg.in_channels, device=DEVICE, dtype=DTYPE)
    txt = torch.randn(1, 512, 4096, device=DEVICE, dtype=DTYPE)
    y = torch.randn(1, 768, device=DEVICE, dtype=DTYPE)
    t, guidance = torch.tensor([0.5], device=DEVICE), torch.tensor([3.5], device=DEVICE)
    i_ids = torch.cat([img_ids(1, 64, 64, DEVICE), img_ids(1, reference, reference, DEVICE, index=REFERENCE_INDEX)], dim=1)
    t_ids = txt_ids(1, 512, DEVICE)
    what = {"flux-dev": "FLUX.1-dev transformer (4096 img + 512 text tokens)",
            "flux-fill": "FLUX.1 Fill transformer (384 input channels; 4096 img + 512 text tokens)",
            "flux-kontext": "FLUX.1 Kontext transformer (4096 img + 4096 reference + 512 text tokens)"}[tool]
    # As the pipelines run it (--graphs): the blocks' modulations taken ahead, once per run (flux/pipeline.py).
    modulations = ours.modulations(t, y, guidance) if args.graphs else None
    return Case(what + (f", zflux {precision}" if precision else ""), lambda: ref(img, txt, y, t, i_ids[0], t_ids[0], guidance, return_dict=False)[0],
                lambda: forward_of(ours, args.graphs)(img, i_ids, txt, t_ids, t, y, guidance, modulations=modulations))


def vae_case(args: argparse.Namespace) -> Case:
    from diffusers import AutoencoderKL

    from zflux.common.vae import PRESETS, Autoencoder, from_diffusers

    cfg = PRESETS["flux"]
    n = len(cfg.block_out_channels)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()
              if k not in ("patch_size", "batch_norm_eps")}  # FLUX.2's fields, which AutoencoderKL does not take
    ref = random_model(lambda: AutoencoderKL(**kwargs, down_block_types=["DownEncoderBlock2D"] * n,
                                             up_block_types=["UpDecoderBlock2D"] * n))
    ours = load_into(build_on_meta(lambda: Autoencoder(cfg)), from_diffusers(ref.state_dict()))
    ours.cuda_graphs = args.graphs
    z = torch.randn(1, cfg.latent_channels, 128, 128, device=DEVICE, dtype=DTYPE)
    return Case("VAE decode 1024x1024", lambda: ref.decode(z).sample, lambda: ours.decode(z))


def vae_flux2_case(args: argparse.Namespace) -> Case:
    """FLUX.2's 32-channel autoencoder, decoding a 1024x1024 image."""
    from diffusers import AutoencoderKLFlux2

    from zflux.common.vae import PRESETS, Autoencoder, from_diffusers

    ref = random_model(AutoencoderKLFlux2)
    ours = load_into(build_on_meta(lambda: Autoencoder(PRESETS["flux2"])), from_diffusers(ref.state_dict()))
    ours.cuda_graphs = args.graphs
    z = torch.randn(1, 32, 128, 128, device=DEVICE, dtype=DTYPE)
    return Case("FLUX.2 VAE decode 1024x1024", lambda: ref.decode(z).sample, lambda: ours.decode(z))


def qwen3_encode_case(args: argparse.Namespace) -> Case:
    """Z-Image's prompt encode: Qwen3-4B (random, real shape), second-to-last hidden states, one model shared by both
    (compiled for both with --compile): diffusers over the prompt padded to 512 tokens, ours over its own tokens, as CUDA
    graphs with --graphs (scripts/bench_encode.py has both and the errors). The tokenizer is the tests' byte-level one."""
    import sys
    from pathlib import Path

    from diffusers import ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from zflux.zimg.text import Qwen3PromptEncoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_text import QWEN3_4B, qwen_tokenizer

    tokenizer = qwen_tokenizer()
    with torch.device(DEVICE):
        qwen = Qwen3Model(Qwen3Config(**QWEN3_4B))
    qwen = qwen.to(DTYPE).eval()
    if args.compile:
        qwen.compile()
    ref = ZImagePipeline(scheduler=None, vae=None, text_encoder=qwen, tokenizer=tokenizer, transformer=None)
    ours = Qwen3PromptEncoder(qwen, tokenizer)
    ours.cuda_graphs = args.graphs
    prompt = "a red fox standing in fresh snow at the edge of a pine forest, early morning light, soft mist between the trees"
    n = int(ours([prompt])[1].sum())
    return Case(f"Qwen3-4B prompt encode ({n} tokens; diffusers pads to 512)",
                lambda: ref.encode_prompt(prompt, torch.device(DEVICE), do_classifier_free_guidance=False)[0][0],
                lambda: ours([prompt])[0])


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


def flux2_case(args: argparse.Namespace, variant: str, precision: str | None = None) -> Case:
    """One FLUX.2 NFE (4096 img + 512 text tokens). Ours is built from diffusers' weights after they are timed, sharing
    every tensor but the fused double-block qkv: [dev] (64 GB in bf16) cannot hold two copies on one 80 GB GPU."""
    from diffusers import Flux2Transformer2DModel

    from zflux.flux.flux2.convert import from_diffusers
    from zflux.flux.flux2.model import PRESETS, Flux2

    cfg = PRESETS[variant]
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
    held = {"ref": random_model(lambda: Flux2Transformer2DModel(**kwargs))}
    if args.compile:
        held["ref"].compile_repeated_blocks(fullgraph=True)
    img = torch.randn(1, 4096, cfg.in_channels, device=DEVICE, dtype=DTYPE)
    txt = torch.randn(1, 512, cfg.joint_attention_dim, device=DEVICE, dtype=DTYPE)
    rows, cols = torch.meshgrid(torch.arange(64, device=DEVICE), torch.arange(64, device=DEVICE), indexing="ij")
    i_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(1, 4096, 4)
    t_ids = torch.zeros(1, 512, 4, dtype=torch.long, device=DEVICE)
    t_ids[..., 3] = torch.arange(512, device=DEVICE)
    t = torch.tensor([0.5], device=DEVICE)
    guidance = torch.tensor([4.0], device=DEVICE) if cfg.guidance_embeds else None

    def make_ours() -> Callable[[], torch.Tensor]:
        state_dict = from_diffusers(held.pop("ref").state_dict())
        torch.cuda.empty_cache()
        ours = apply_precision(load_into(build_on_meta(lambda: Flux2(cfg, backend=args.backend)), state_dict), precision)
        if args.compile:
            for blocks in (ours.double_blocks, ours.single_blocks):
                compile_blocks(blocks)
        return lambda: forward_of(ours, args.graphs)(img, i_ids, txt, t_ids, t, guidance)

    return Case(f"FLUX.2 {variant.removeprefix('flux2-')} transformer (4096 img + 512 text tokens)"
                + (f", zflux {precision}" if precision else ""),
                lambda: held["ref"](img, txt, t, i_ids[0], t_ids[0], guidance, return_dict=False)[0], make_ours=make_ours)


def flux2_pipeline_case(args: argparse.Namespace) -> Case:
    """FLUX.2 klein 4B (distilled) end to end at 1024x1024: Qwen3-4B prompt encoding, 4 NFE, VAE decode, PIL image.

    Random weights at the real sizes; ours shares (but the fused qkv) diffusers' transformer weights and
    copies its Qwen3-4B, of which it runs the 28 of 36 layers whose outputs are read. The tokenizer is the tests' tiny one: the text is always 512 tokens.
    """
    import copy
    import sys
    from pathlib import Path

    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from zflux.common.vae import PRESETS as VAE_PRESETS
    from zflux.common.vae import Autoencoder
    from zflux.common.vae import from_diffusers as vae_from_diffusers
    from zflux.flux.flux2.convert import from_diffusers
    from zflux.flux.flux2.model import PRESETS, Flux2
    from zflux.flux.flux2.pipeline import Flux2Pipeline
    from zflux.flux.flux2.text import Flux2PromptEncoder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_text import qwen_tokenizer

    cfg, tokenizer = PRESETS["flux2-klein-4b"], qwen_tokenizer()
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
    with torch.device(DEVICE):  # built in place: the rotary tables and batch-norm statistics are buffers
        qwen = Qwen3ForCausalLM(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                                            num_key_value_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
                                            max_position_embeddings=40960)).to(DTYPE).eval()
        vae = AutoencoderKLFlux2().to(DTYPE).eval()
    ref = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
                             text_encoder=qwen, tokenizer=tokenizer,
                             transformer=random_model(lambda: Flux2Transformer2DModel(**kwargs)), is_distilled=True)
    ref.set_progress_bar_config(disable=True)
    transformer = load_into(build_on_meta(lambda: Flux2(cfg, backend=args.backend)), from_diffusers(ref.transformer.state_dict()))
    ours = Flux2Pipeline(transformer, load_into(build_on_meta(lambda: Autoencoder(VAE_PRESETS["flux2"])),
                                                vae_from_diffusers(vae.state_dict())),
                         Flux2PromptEncoder(copy.deepcopy(qwen.model), tokenizer), "flux2-klein-4b")  # a copy: ours drops 8 layers
    if args.compile:
        ref.transformer.compile_repeated_blocks(fullgraph=True)
        for blocks in (transformer.double_blocks, transformer.single_blocks):
            compile_blocks(blocks)
    prompt = "a photo of a red fox in the snow"
    return Case("FLUX.2 klein 4B pipeline 1024x1024 (encode + 4 NFE + decode)",
                lambda: ref(prompt=prompt, height=1024, width=1024, num_inference_steps=4,
                            generator=torch.Generator().manual_seed(0)).images[0],
                lambda: ours.generate(prompt, seed=0, height=1024, width=1024, progress=False))


CASES = {"zimage": zimage_case, "zimage-cfg": lambda args: zimage_case(args, (128, 90)), "zimage-controlnet": zimage_controlnet_case,
         "flux": flux_case, "flux-fill": lambda args: flux_case(args, "flux-fill"),
         "flux-kontext": lambda args: flux_case(args, "flux-kontext"), "vae": vae_case, "vae-flux2": vae_flux2_case,
         "qwen3-encode": qwen3_encode_case,
         "flux2-klein-4b": lambda args: flux2_case(args, "flux2-klein-4b"), "flux2-klein-9b": lambda args: flux2_case(args, "flux2-klein-9b"),
         "flux2-dev": lambda args: flux2_case(args, "flux2-dev"), "flux2-klein-4b-pipeline": flux2_pipeline_case,
         "zimage-fp8": lambda args: zimage_case(args, precision="fp8"), "flux-fp8": lambda args: flux_case(args, precision="fp8"),
         "flux2-klein-4b-fp8": lambda args: flux2_case(args, "flux2-klein-4b", precision="fp8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--backend", choices=("auto", "sdpa", "triton"), default="auto", help="zflux backend")
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks of both")
    parser.add_argument("--graphs", action="store_true", help="replay zflux's transformer (and Qwen3) forwards and decodes as CUDA graphs, as its "
                        "pipelines do (common/graphs.py; the closures hold the model: the graphs keep only a weak reference), "
                        "FLUX.1's with the blocks' modulations taken ahead, as its pipeline does once per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also profile one call of each (see the module docstring)")
    args = parser.parse_args()
    rate = gemm_rate() if args.profile else 0.0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backend {args.backend}, compile {args.compile}, "
          f"zflux CUDA graphs {args.graphs}\n")
    print("| what | diffusers ms | zflux ms | speed-up | diffusers peak GiB | zflux peak GiB |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        case = CASES[name](args)
        t_ref, m_ref = time_ms(case.theirs, args.warmup, args.iters)
        if args.profile:
            profile(f"diffusers, {case.name}", case.theirs, rate)
        ours = case.make_ours() if case.make_ours else case.ours
        t_ours, m_ours = time_ms(ours, args.warmup, args.iters)
        if args.profile:
            profile(f"zflux, {case.name}", ours, rate)
        print(f"| {case.name} | {t_ref:.1f} | {t_ours:.1f} | {t_ref / t_ours:.2f}x | {m_ref:.2f} | {m_ours:.2f} |", flush=True)
        if case.plain is not None:
            extra_ref = t_ref - time_ms(case.plain.theirs, args.warmup, args.iters)[0]
            extra_ours = t_ours - time_ms(case.plain.ours, args.warmup, args.iters)[0]
            print(f"| {case.name.split(' (')[0]}: extra per step over {case.plain.name} | {extra_ref:.1f} | {extra_ours:.1f} | "
                  f"{extra_ref / extra_ours:.2f}x | | |", flush=True)
        del case, ours  # before the next case is built: FLUX.2 [dev] needs the whole GPU
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
