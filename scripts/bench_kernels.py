"""Time the Triton kernels against PyTorch eager, torch.compile and, for attention, every SDPA backend.

    python scripts/bench_kernels.py                 # everything
    python scripts/bench_kernels.py --only attention   # both attention tables
    python scripts/bench_kernels.py --only wide        # the wide-head attention row alone
    python scripts/bench_kernels.py --only gemm        # fp8 GEMMs: exact against fast accumulation

bf16, batch 1 unless noted, at the shapes the two models use at 1024x1024 (FLUX.1: 4608 tokens of
3072 channels, 24 heads of 128; Z-Image: 4224 tokens of 3840, 30 heads of 128) and at 4x the tokens.

Memory-bound ops (norms, modulation, QK-norm + RoPE) are captured in a CUDA graph, cycling over
enough distinct input sets that they cannot sit in L2, and timed by replaying it (median of the
replays); GB/s counts each input read once and each output written once, and `vs copy` relates it
to the bandwidth of cloning one (S, C) activation in the same run. Attention is timed with
triton.testing.do_bench (L2 flushed, median); TFLOP/s counts 4 * B * H * S * S_kv * D (the fp8
kernel's time includes quantizing q, k, v, which it does itself); the wide-head table times the
autoencoders' mid-block attention (one head of 512 channels over 128 x 128 latent pixels). `vs best`
is the best PyTorch path's time over ours: above 1 means the kernel is faster. The fp8 GEMM table times the fp8
linears at each model's shapes (per-row scales, bf16 out, `torch._scaled_mm`) with cuBLAS's exact accumulation and
with the tensor cores' own (fast: what FP8Linear runs, common/fp8.py), replayed from a CUDA graph over two input sets
(their weights do not fit in L2), and each one's relative error against the exact product of the same e4m3 values
(fp32 out). Prints markdown.
"""

import argparse
import statistics
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from zflux.common import norms, rope
from zflux.common.quant import Fp8Tensor, dequantize, quantize
from zflux.kernels import attention as attn_kernels
from zflux.kernels import modulate, rmsnorm, wide_attention
from zflux.kernels.quantize import quantize_heads

DEVICE, DTYPE = "cuda", torch.bfloat16
L2_BYTES = 50 * 2**20
MODELS = {"FLUX.1": dict(S=4608, C=3072, H=24), "Z-Image": dict(S=4224, C=3840, H=30)}


def graph_time_ms(fn: Callable, input_sets: list[tuple], loops: int = 10, replays: int = 15) -> float:
    """Median milliseconds per call of fn over the input sets, replayed from one CUDA graph."""
    for args in input_sets:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(loops):
            for args in input_sets:
                fn(*args)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / (loops * len(input_sets))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written, over 2 GiB buffers."""
    src = torch.randn(2**30 // 2, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), [()], loops=5)
    return 2 * src.nbytes / ms / 1e6


def activation_copy_gbs(S: int, C: int) -> float:
    """GB/s (read + written) of cloning one (1, S, C) activation, over enough copies that none sits in L2."""
    nbytes = 2 * S * C * torch.finfo(DTYPE).bits // 8
    sets = [(torch.randn(1, S, C, device=DEVICE, dtype=DTYPE),) for _ in range(max(2, -(-4 * L2_BYTES // nbytes)))]
    return nbytes / graph_time_ms(lambda t: t.clone(), sets) / 1e6


def memory_ops(S: int, C: int, H: int, model: str) -> list[tuple[str, Callable, Callable, Callable[[], tuple], int]]:
    """(name, PyTorch function (common/'s definition), Triton function, input maker, bytes moved) for one model's shapes."""
    n = S * C * 2

    def x():
        return torch.randn(1, S, C, device=DEVICE, dtype=DTYPE)

    def vec():
        return 0.1 * torch.randn(1, 1, C, device=DEVICE, dtype=DTYPE)

    def weight():
        return 1 + 0.1 * torch.randn(C, device=DEVICE, dtype=DTYPE)

    def qk():
        qkv = torch.randn(1, S, 3 * C, device=DEVICE, dtype=DTYPE)
        q, k, _ = qkv.view(1, S, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (B, H, S, D) views, as in the models
        angle = torch.rand(1, S, C // H // 2, device=DEVICE) * 100
        w = 1 + 0.1 * torch.randn(C // H, device=DEVICE, dtype=DTYPE)
        return q, k, w, w, 1e-6, angle.cos(), angle.sin()

    ops = [("rms_norm", norms.rms_norm, rmsnorm.rms_norm, lambda: (x(), weight(), 1e-6), 2 * n),
           ("qk_norm_rope", rope.qk_norm_rope, rmsnorm.qk_norm_rope, qk, 4 * n + 4 * S * (C // H))]
    if model == "FLUX.1":
        ops.append(("layer_norm_modulate", norms.layer_norm_modulate, modulate.layer_norm_modulate,
                    lambda: (x(), vec(), vec(), 1e-6), 2 * n))
        ops.append(("gated_residual", norms.gated_residual, modulate.gated_residual, lambda: (x(), x(), vec()), 3 * n))
        ops.append(("gated_residual_layer_norm_modulate", norms.gated_residual_layer_norm_modulate,
                    modulate.gated_residual_layer_norm_modulate, lambda: (x(), x(), vec(), vec(), vec(), 1e-6), 4 * n))
    else:
        ops.append(("rms_norm_scale", norms.rms_norm_scale, modulate.rms_norm_scale, lambda: (x(), weight(), vec(), 1e-5), 2 * n))
        ops.append(("gated_rms_residual", norms.gated_rms_residual, modulate.gated_rms_residual,
                    lambda: (x(), x(), weight(), vec(), 1e-5), 3 * n))
        ops.append(("gated_rms_residual_norm_scale", norms.gated_rms_residual_norm_scale,
                    modulate.gated_rms_residual_norm_scale, lambda: (x(), x(), weight(), vec(), weight(), vec(), 1e-5), 4 * n))
    return ops


def bench_memory(copy_gbs: float) -> None:
    print(f"\n### Memory-bound kernels (2 GiB device-to-device copy: {copy_gbs:.0f} GB/s)\n")
    print("| model | tokens | op | eager GB/s | compile GB/s | triton GB/s | triton vs copy | vs best PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for model, shape in MODELS.items():
        for scale in (1, 4):
            S, C, H = shape["S"] * scale, shape["C"], shape["H"]
            same_bytes_copy = activation_copy_gbs(S, C)
            print(f"| {model} | {S} | copy (same bytes) | {same_bytes_copy:.0f} | | | | |")
            for name, torch_fn, triton_fn, make, nbytes in memory_ops(S, C, H, model):
                sets = [make() for _ in range(max(2, -(-4 * L2_BYTES // nbytes)))]
                eager = graph_time_ms(torch_fn, sets)
                compiled = graph_time_ms(torch.compile(torch_fn, fullgraph=True, dynamic=False), sets)
                ours = graph_time_ms(triton_fn, sets)
                gbs = [nbytes / t / 1e6 for t in (eager, compiled, ours)]
                print(f"| {model} | {S} | {name} | {gbs[0]:.0f} | {gbs[1]:.0f} | {gbs[2]:.0f} | {gbs[2] / same_bytes_copy:.0%} "
                      f"| {min(eager, compiled) / ours:.2f}x |")
                del sets
                torch.cuda.empty_cache()


def sdpa_with(backend: SDPBackend | None) -> Callable:
    def run(q, k, v, key_lens):
        mask = None if key_lens is None else (torch.arange(q.shape[2], device=DEVICE) < key_lens[:, None])[:, None, None, :]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return run


ATTENTION_PATHS = {"triton": attn_kernels.flash_attention, "triton fp8": attn_kernels.flash_attention_fp8,
                   "cuDNN": sdpa_with(SDPBackend.CUDNN_ATTENTION),
                   "flash": sdpa_with(SDPBackend.FLASH_ATTENTION), "efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
                   "sdpa default": sdpa_with(None)}


def attention_inputs(B: int, S: int, H: int, D: int = 128):
    """q, k contiguous (as qk_norm_rope writes them), v a strided slice of the fused qkv projection."""
    qkv = torch.randn(B, S, 3, H, D, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, S, D) each
    return q.contiguous(), k.contiguous(), v


def fp8_kernel_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lens: torch.Tensor | None) -> Callable:
    """The fp8 kernel's own call on inputs quantized beforehand (as the fused QK-norm + RoPE kernel hands them over)."""
    vt, v_scale = quantize_heads(v, per="channel", transpose=True)
    quantized = (*quantize_heads(q, per="token"), *quantize_heads(k, per="head"), vt, v_scale)
    return lambda: attn_kernels.flash_attention_fp8_bshd(*quantized, key_lens, q.dtype)


def bench_attention() -> None:
    print("\n### Attention (bf16, head dim 128, non-causal), TFLOP/s\n")
    names = [*ATTENTION_PATHS, "triton fp8 kernel"]
    print("| shape | " + " | ".join(names) + " | triton vs cuDNN | triton vs best | triton fp8 vs cuDNN | fp8 kernel vs cuDNN |")
    print("|---" * (len(names) + 5) + "|")
    cases = []
    for model, shape in MODELS.items():
        for scale in (1, 4):
            cases.append((f"{model} B1 H{shape['H']} S{shape['S'] * scale}", 1, shape["S"] * scale, shape["H"], None))
    cases.append(("Z-Image CFG B2 H30 S4224, keys 4224/4128", 2, 4224, 30, [4224, 4128]))
    for label, B, S, H, lens in cases:
        q, k, v = attention_inputs(B, S, H)
        key_lens = None if lens is None else torch.tensor(lens, device=DEVICE)
        flops = 4 * H * S * 128 * sum(lens or [S] * B)
        calls = {name: partial(fn, q, k, v, key_lens) for name, fn in ATTENTION_PATHS.items()}
        calls["triton fp8 kernel"] = fp8_kernel_only(q, k, v, key_lens)
        tflops = {}
        for name, call in calls.items():
            try:
                ms = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
                tflops[name] = flops / ms / 1e9
            except RuntimeError:  # this SDPA backend does not take these inputs (e.g. a mask)
                tflops[name] = None
        best = max(t for name, t in tflops.items() if not name.startswith("triton") and t)
        cells = " | ".join("n/a" if t is None else f"{t:.0f}" for t in tflops.values())
        ratios = (f"{tflops[name] / tflops['cuDNN']:.2f}x" if tflops["cuDNN"] else "n/a"
                  for name in ("triton", "triton fp8", "triton fp8 kernel"))
        cudnn, fp8, fp8_kernel = ratios
        print(f"| {label} | {cells} | {cudnn} | {tflops['triton'] / best:.2f}x | {fp8} | {fp8_kernel} |")
        del q, k, v, calls
        torch.cuda.empty_cache()
    tuner = attn_kernels._flash_attention_kernel
    print(f"\nAutotuned attention config: {tuner.best_config}")
    for config, ms in sorted(getattr(tuner, "configs_timings", {}).items(), key=lambda item: item[1]):
        print(f"  {config}: {ms}")


def bench_wide_attention() -> None:
    print("\n### Wide-head attention (bf16, the autoencoders' mid block at 1024x1024), ms and TFLOP/s\n")
    paths = {"triton wide": lambda q, k, v, key_lens: wide_attention.wide_attention(q, k, v),
             "efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
             "sdpa default": sdpa_with(None)}
    print("| shape | " + " | ".join(paths) + " | triton vs sdpa default |")
    print("|---" * (len(paths) + 2) + "|")
    B, H, S, D = 1, 1, 16384, 512
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=DTYPE) for _ in range(3))
    flops = 4 * B * H * S * S * D
    ms = {name: triton.testing.do_bench(lambda: fn(q, k, v, None), warmup=25, rep=200, return_mode="median")
          for name, fn in paths.items()}
    cells = " | ".join(f"{t:.2f} ({flops / t / 1e9:.0f})" for t in ms.values())
    print(f"| B{B} H{H} S{S} D{D} | {cells} | {ms['sdpa default'] / ms['triton wide']:.2f}x |")
    tuner = wide_attention._wide_attention_kernel
    print(f"\nAutotuned wide attention config: {tuner.best_config}")
    for config, t in sorted(getattr(tuner, "configs_timings", {}).items(), key=lambda item: item[1]):
        print(f"  {config}: {t}")


GEMM_SHAPES = [  # (name, M, K, N): Z-Image's linears at 4224 tokens, FLUX.1's double blocks' image (4096) and text
    # (512) streams and its single blocks (4608)
    ("Z-Image qkv", 4224, 3840, 11520), ("Z-Image out", 4224, 3840, 3840), ("Z-Image w1 / w3", 4224, 3840, 10240),
    ("Z-Image w2", 4224, 10240, 3840), ("FLUX.1 img qkv", 4096, 3072, 9216), ("FLUX.1 img proj", 4096, 3072, 3072),
    ("FLUX.1 img mlp.0", 4096, 3072, 12288), ("FLUX.1 img mlp.2", 4096, 12288, 3072), ("FLUX.1 txt qkv", 512, 3072, 9216),
    ("FLUX.1 txt mlp.2", 512, 12288, 3072), ("FLUX.1 linear1", 4608, 3072, 21504), ("FLUX.1 linear2", 4608, 15360, 3072)]


def bench_gemm() -> None:
    print("\n### fp8 GEMMs (e4m3, per-row scales, bf16 out): exact and fast accumulation, us (TFLOP/s) and error\n")
    print("| shape | M x K x N | exact | fast | speed-up | error, exact | error, fast |")
    print("|---" * 7 + "|")
    for label, M, K, N in GEMM_SHAPES:
        sets = []
        for _ in range(2):
            x, w = quantize(torch.randn(M, K, device=DEVICE)), quantize(torch.randn(N, K, device=DEVICE) * K**-0.5)
            sets.append((x.data, x.scale, w.data, w.scale))
        cells, errors = [], []
        exact = dequantize(Fp8Tensor(*sets[0][:2])) @ dequantize(Fp8Tensor(*sets[0][2:])).T  # (M, N) fp32
        for fast in (False, True):
            def gemm(a, sa, b, sb, out_dtype=DTYPE):
                return torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb.T, out_dtype=out_dtype, use_fast_accum=fast)

            us = graph_time_ms(gemm, sets, loops=5, replays=10) * 1e3
            cells.append(us)
            errors.append(((gemm(*sets[0], out_dtype=torch.float32) - exact).norm() / exact.norm()).item())
        times = " | ".join(f"{t:.1f} ({2 * M * K * N / t / 1e6:.0f})" for t in cells)
        print(f"| {label} | {M} x {K} x {N} | {times} | {cells[0] / cells[1]:.2f}x | {errors[0]:.1e} | {errors[1]:.1e} |")
        del sets, exact
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["memory", "attention", "wide", "gemm"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.only in (None, "memory"):
        bench_memory(copy_bandwidth())
    if args.only in (None, "attention"):
        bench_attention()
    if args.only in (None, "attention", "wide"):
        bench_wide_attention()
    if args.only in (None, "gemm"):
        bench_gemm()


if __name__ == "__main__":
    main()
