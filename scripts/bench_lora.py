"""Time LoRA loading and the unfused side path against diffusers (PEFT), full-size FLUX.1-dev on the GPU.

    python scripts/bench_lora.py                 # rank 64 on every transformer Linear, 1024x1024, bf16
    python scripts/bench_lora.py --rank 16 --iters 10

Random FLUX.1-dev weights (bf16, both models resident), one random LoRA file in diffusers' format
(`transformer.<module>.lora_A/B.weight`, bf16) on every Linear of the transformer. Rows:
- load + fuse: zflux's load_lora(fuse=True) (file read, fp32 update, rounded into the weights) against
  diffusers' load_lora_adapter + fuse_lora; then unfusing (ours checked bit-exact by a fingerprint);
- the side path: one forward (one NFE, 4096 image + 512 text tokens) without a LoRA and with the unfused
  LoRA (ours: load_lora(fuse=False); diffusers: the PEFT adapter active), and their difference.
CUDA-event medians over --iters runs after --warmup runs; prints a markdown table with ours/diffusers.
Needs peft (and accelerate, which peft imports).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench import DEVICE, DTYPE, random_model, time_ms
from zflux.common.lora import KeyMap, LoraSet
from zflux.common.weights import build_on_meta, load_into


def lora_file(model: torch.nn.Module, rank: int, folder: Path) -> Path:
    """A random rank-`rank` LoRA on every Linear of diffusers' transformer, saved in diffusers' format."""
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, dtype=DTYPE) / m.in_features ** 0.5
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, dtype=DTYPE) * 0.01
    path = folder / f"flux-dev-rank{rank}.safetensors"
    save_file(tensors, path)
    return path


def fingerprint(model: torch.nn.Module) -> list[int]:
    """A per-parameter checksum of the raw bits: equal lists mean (with overwhelming odds) equal weights."""
    return [int(p.view(torch.int16).sum(dtype=torch.int64)) for p in model.parameters()]


def seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from diffusers import FluxTransformer2DModel

    from zflux.flux.convert import from_diffusers, to_diffusers
    from zflux.flux.model import PRESETS, Flux
    from zflux.flux.pipeline import img_ids, txt_ids

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    cfg = PRESETS["flux-dev"]
    ref = random_model(lambda: FluxTransformer2DModel(guidance_embeds=True))
    ours = load_into(build_on_meta(lambda: Flux(cfg)), from_diffusers(ref.state_dict()))
    img = torch.randn(1, 4096, cfg.in_channels, device=DEVICE, dtype=DTYPE)
    txt = torch.randn(1, 512, 4096, device=DEVICE, dtype=DTYPE)
    y = torch.randn(1, 768, device=DEVICE, dtype=DTYPE)
    t, guidance = torch.tensor([0.5], device=DEVICE), torch.tensor([3.5], device=DEVICE)
    i_ids, t_ids = img_ids(1, 64, 64, DEVICE), txt_ids(1, 512, DEVICE)
    run_ours = lambda: ours(img, i_ids, txt, t_ids, t, y, guidance)  # noqa: E731
    run_theirs = lambda: ref(img, txt, y, t, i_ids[0], t_ids[0], guidance, return_dict=False)[0]  # noqa: E731

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        path = lora_file(ref, args.rank, Path(folder))
        plain = fingerprint(ours), time_ms(run_ours, args.warmup, args.iters)[0], time_ms(run_theirs, args.warmup, args.iters)[0]
        loras = LoraSet({"transformer": KeyMap(ours, to_diffusers)}, family="flux.1")
        with torch.no_grad():
            ours_fuse = seconds(lambda: loras.load(path, fuse=True))
            ours_unfuse = seconds(loras.unload)
            exact = fingerprint(ours) == plain[0]
            theirs_fuse = seconds(lambda: (ref.load_lora_adapter(str(path), adapter_name="a", prefix="transformer"), ref.fuse_lora()))
            theirs_unfuse = seconds(ref.unfuse_lora)
            loras.load(path, fuse=False)
        rows["load + fuse (s)"] = (ours_fuse, theirs_fuse)
        rows[f"unfuse (s){'' if exact else ' NOT EXACT'}"] = (ours_unfuse, theirs_unfuse)
        side = time_ms(run_ours, args.warmup, args.iters)[0], time_ms(run_theirs, args.warmup, args.iters)[0]
    rows["forward, no LoRA (ms)"] = plain[1:]
    rows["forward, unfused LoRA (ms)"] = side
    rows["unfused LoRA's cost per NFE (ms)"] = (side[0] - plain[1], side[1] - plain[2])

    print(f"\nFLUX.1-dev, rank-{args.rank} LoRA on every transformer Linear, bf16, {torch.cuda.get_device_name()}\n")
    print("| | zflux | diffusers + peft | zflux / diffusers |\n|---|---|---|---|")
    for what, (mine, theirs) in rows.items():
        print(f"| {what} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f} |")


if __name__ == "__main__":
    main()
