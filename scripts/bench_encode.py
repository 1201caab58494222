"""Z-Image's prompt encode, diffusers' and zflux's, timed in one process on one random Qwen3-4B, with the errors.

    python scripts/bench_encode.py                             # GPU: Qwen3-4B at its real shape, bf16
    python scripts/bench_encode.py --tiny --device cpu --iters 1   (the CPU test's run: a tiny Qwen3)

Three encodes of the same prompts on the same model:
- `diffusers`: ZImagePipeline.encode_prompt itself: Qwen3 over the prompt padded to 512 tokens with
  the padding mask, the real tokens kept (with CFG, a second 512-token call for the empty negative
  prompt);
- `zflux eager`: Qwen3PromptEncoder over the positions the prompts use (zimg/text.py), CUDA graphs off;
- `zflux graphed`: the same, replaying a CUDA graph (the pipelines' default on a GPU).

Rows: the prompt alone (Turbo), and the prompt with the empty negative prompt (base's CFG: one batch of
two for zflux). Per row: the median ms of --iters calls after --warmup (CUDA events on a GPU, the wall
clock on the CPU), ratios to diffusers, and the largest relative error over the captions,
||ours - diffusers|| / ||diffusers|| on the real tokens, with the model in bf16 (the timed run) and
again in fp32 (TF32 off; zflux's graphs captured again for it). The tokenizer is the tests' byte-level
one (tests/test_text.py), built offline; the prompt is scripts/bench_pipeline.py's, ~200 tokens with the
chat template. Random weights: the times are those of the real model's shapes.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_pipeline import PROMPT  # noqa: E402
from test_text import QWEN3_4B, qwen_tokenizer  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
IMPLS = ("diffusers", "zflux eager", "zflux graphed")
Encode = Callable[[bool], list[Tensor]]  # cfg -> the captions' real-token features (L_i, hidden), the negative's last


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of one fn() call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def encoders(model, tokenizer) -> dict[str, Encode]:
    """Each implementation's encode of PROMPT (and with cfg the empty negative prompt) on `model`."""
    from diffusers import ZImagePipeline

    from zflux.zimg.text import Qwen3PromptEncoder

    theirs = ZImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None)
    eager, graphed = Qwen3PromptEncoder(model, tokenizer), Qwen3PromptEncoder(model, tokenizer)
    graphed.cuda_graphs = True

    def diffusers(cfg: bool) -> list[Tensor]:
        positive, negative = theirs.encode_prompt(PROMPT, model.device, do_classifier_free_guidance=cfg)
        return positive + negative

    def zflux(encoder: Qwen3PromptEncoder) -> Encode:
        def encode(cfg: bool) -> list[Tensor]:
            features, mask = encoder([PROMPT, ""] if cfg else [PROMPT])  # (B, L', hidden), (B, L')
            return [f[m] for f, m in zip(features, mask)]
        return encode

    return dict(zip(IMPLS, (diffusers, zflux(eager), zflux(graphed))))


def largest_error(ours: list[Tensor], theirs: list[Tensor]) -> float:
    """max over the captions of ||ours - theirs|| / ||theirs||, in fp64."""
    return max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(ours, theirs))


def errors(impls: dict[str, Encode], cfg: bool) -> dict[str, float]:
    """zflux's largest errors against diffusers, by implementation."""
    with torch.no_grad():
        theirs = impls["diffusers"](cfg)
        return {name: largest_error(impls[name](cfg), theirs) for name in IMPLS[1:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3 (the CPU test's run) instead of Qwen3-4B")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    from transformers import Qwen3Config, Qwen3Model

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 errors are fp32's
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    with device:
        model = Qwen3Model(Qwen3Config(pad_token_id=tokenizer.pad_token_id, **(TINY if args.tiny else QWEN3_4B)))
    model = model.to(torch.bfloat16).eval()
    impls = encoders(model, tokenizer)
    with torch.no_grad():
        tokens = len(impls["zflux eager"](False)[0])
    cases = {f"prompt ({tokens} tokens)": False, "prompt + empty negative (CFG)": True}
    rows = {}
    for case, cfg in cases.items():
        with torch.no_grad():
            ms = {name: median_ms(lambda: encode(cfg), device, args.warmup, args.iters) for name, encode in impls.items()}
        rows[case] = ms, errors(impls, cfg)
    model.float()  # in place: the graphed encoder sees its weights move and captures again
    for case, cfg in cases.items():
        rows[case] += (errors(impls, cfg),)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; Qwen3 {'tiny' if args.tiny else '4B'}, bf16 times, median of {args.iters}\n")
    print("| case | diffusers ms | zflux eager ms | zflux graphed ms | eager speed-up | graphed speed-up "
          "| bf16 error eager / graphed | fp32 error eager / graphed |")
    print("|---|---|---|---|---|---|---|---|")
    for case, (ms, bf16, fp32) in rows.items():
        ref = ms["diffusers"]
        print(f"| {case} | {ref:.1f} | {ms['zflux eager']:.1f} | {ms['zflux graphed']:.1f} | {ref / ms['zflux eager']:.2f}x "
              f"| {ref / ms['zflux graphed']:.2f}x | {bf16['zflux eager']:.1e} / {bf16['zflux graphed']:.1e} "
              f"| {fp32['zflux eager']:.1e} / {fp32['zflux graphed']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
