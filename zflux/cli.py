"""The `zflux` command: generate an image, say what a checkpoint is, convert between checkpoint layouts.

    zflux generate --model z-image-turbo --weights Z-Image-Turbo --prompt "a red fox in snow" --out fox.png
    zflux generate --model flux-dev --weights FLUX.1-dev/flux1-dev.safetensors --prompt "a red fox in snow" --out fox.png
    zflux info FLUX.1-dev/flux1-dev.safetensors
    zflux convert Z-Image-Turbo/transformer z_image_turbo.safetensors --to original

`--weights` is a diffusers snapshot folder (model_index.json + subfolders) or a transformer
.safetensors file; with a file, the autoencoder is `--vae` (default: ae.safetensors beside the file)
and the text encoders come from `--text-encoders` (default: the file's folder), a folder holding
text_encoder/ and tokenizer/ (FLUX.1: also text_encoder_2/ and tokenizer_2/), as in the models'
Hugging Face repositories.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from zflux.common import vae as vae_layouts
from zflux.common.ops import BACKENDS
from zflux.common.identify import identify
from zflux.common.images import load_image, save_image
from zflux.common.pipeline import check_request, read_scheduler
from zflux.common.weights import CheckpointError, read_state_dict, save_state_dict
from zflux.flux import convert as flux_layouts
from zflux.flux.flux2 import convert as flux2_layouts
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg import convert as zimage_layouts
from zflux.zimg.pipeline import ZImagePipeline, variant_of

MODELS = ("z-image-turbo", "z-image", "flux-schnell", "flux-dev")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = {"z-image": zimage_layouts, "flux.1": flux_layouts, "flux.2": flux2_layouts, "autoencoder": vae_layouts}  # family -> module with the key maps
SIZE_MULTIPLE = 16  # pixels: the autoencoder's 8x times the 2x2 patches, for every model here


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `zflux` and its three subcommands."""
    parser = argparse.ArgumentParser(prog="zflux", description="Z-Image and FLUX.1 text-to-image without diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--model", required=True, choices=MODELS)
    gen.add_argument("--weights", required=True, help="snapshot folder (model_index.json + subfolders) or transformer .safetensors file")
    gen.add_argument("--vae", help="with a transformer file: the autoencoder file (default: ae.safetensors beside it)")
    gen.add_argument("--text-encoders", help="with a transformer file: folder holding text_encoder/, tokenizer/ (FLUX.1: also "
                                             "text_encoder_2/, tokenizer_2/); default: the file's folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="Z-Image with --guidance > 0; FLUX.1 with --true-cfg > 1")
    gen.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024, or the init image's height)")
    gen.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024, or the init image's width)")
    gen.add_argument("--steps", type=int, help="default: z-image-turbo 8, z-image 50, flux-schnell 4, flux-dev 28")
    gen.add_argument("--guidance", type=float, help="Z-Image: CFG scale (turbo 0, base 4); flux-dev: embedded guidance (3.5)")
    gen.add_argument("--true-cfg", type=float, default=1.0, help="FLUX.1: real CFG scale against the negative prompt (> 1 turns it on)")
    gen.add_argument("--cfg-normalization", type=float,
                     help="Z-Image: cap the guided prediction's norm at this multiple of the conditional one's")
    gen.add_argument("--cfg-truncation", type=float, help="Z-Image: no CFG once the model time 1 - sigma exceeds this")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--init-image", help="image file to start from (image-to-image)")
    gen.add_argument("--strength", type=float, default=0.6, help="image-to-image: how much of the schedule to run (0-1)")
    gen.add_argument("--out", required=True, help="output image file, e.g. image.png")
    gen.add_argument("--device", help="default: cuda when available, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="bf16")
    gen.add_argument("--offload-text-encoder", action="store_true", help="keep the text encoder on the CPU between prompts")
    gen.add_argument("--backend", choices=BACKENDS, help="attention / norm kernels (default: $ZFLUX_BACKEND or auto)")
    gen.set_defaults(run=generate)

    info = commands.add_parser("info", help="say what a checkpoint file, folder or snapshot holds (reads headers only)")
    info.add_argument("path")
    info.set_defaults(run=describe)

    conv = commands.add_parser("convert", help="convert a Z-Image / FLUX.1 / FLUX.2 transformer or their autoencoders between layouts")
    conv.add_argument("src", help="checkpoint file, index or folder (any layout)")
    conv.add_argument("dst", help="output .safetensors file")
    conv.add_argument("--to", choices=("original", "diffusers"), default="original",
                      help="original: the official single-file layout (BFL's for FLUX.1 and the autoencoder)")
    conv.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `zflux` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # CheckpointError included: bad input, named by the code that found it
        sys.exit(f"zflux {args.command}: error: {e}")


def generate(args: argparse.Namespace) -> None:
    """zflux generate: check the request, load the pipeline, generate, save, report the time taken."""
    check_request(args.prompt, args.height, args.width, SIZE_MULTIPLE)  # before minutes of loading
    init_image = load_image(args.init_image) if args.init_image else None
    if not Path(args.out).suffix:
        raise ValueError(f"--out {args.out} has no file extension (e.g. .png) to choose the image format")

    start = time.perf_counter()
    pipe = load_pipeline(args)
    if args.backend:
        pipe.transformer.backend = args.backend
    loaded = time.perf_counter() - start

    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, steps=args.steps,
                   guidance=args.guidance, seed=args.seed, init_image=init_image, strength=args.strength)
    if isinstance(pipe, ZImagePipeline):
        options |= dict(cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)
    else:
        options |= dict(true_cfg=args.true_cfg)
    start = time.perf_counter()
    image = pipe.generate(args.prompt, **options)
    took = time.perf_counter() - start
    path = save_image(image, args.out)
    print(f"{path}: {image.width}x{image.height}, {pipe.variant}, seed {args.seed}; generated in {took:.2f} s "
          f"(weights loaded in {loaded:.1f} s)")


def load_pipeline(args: argparse.Namespace) -> ZImagePipeline | FluxPipeline:
    """The pipeline for --model from --weights (snapshot folder, or transformer file + --vae + --text-encoders)."""
    zimage = args.model.startswith("z-image")
    options = dict(variant=args.model, device=args.device, dtype=DTYPES[args.dtype], offload_text_encoder=args.offload_text_encoder)
    weights = Path(args.weights)
    if weights.is_dir():
        if args.vae or args.text_encoders:
            raise ValueError("--vae and --text-encoders go with a transformer file; --weights is a folder (a snapshot brings its own)")
        return (ZImagePipeline if zimage else FluxPipeline).from_pretrained(weights, **options)
    if not weights.is_file():
        raise CheckpointError(f"no weights at {weights}")
    vae = Path(args.vae) if args.vae else weights.parent / "ae.safetensors"
    if not vae.exists():
        raise CheckpointError(f"no autoencoder at {vae}: pass --vae (the ae.safetensors file)")
    encoders = Path(args.text_encoders) if args.text_encoders else weights.parent
    needed = ("text_encoder", "tokenizer") if zimage else ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    missing = [f"{name}/" for name in needed if not (encoders / name).is_dir()]
    if missing:
        raise CheckpointError(f"{encoders} lacks the text-encoder subfolder(s) {', '.join(missing)}: pass --text-encoders, a folder "
                              f"holding {', '.join(n + '/' for n in needed)} (e.g. the model's diffusers snapshot)")
    if zimage:
        return ZImagePipeline.from_single_files(weights, vae, encoders / "text_encoder", encoders / "tokenizer", **options)
    return FluxPipeline.from_single_files(weights, vae, t5=encoders / "text_encoder_2", t5_tokenizer=encoders / "tokenizer_2",
                                          clip=encoders / "text_encoder", clip_tokenizer=encoders / "tokenizer", **options)


def describe(args: argparse.Namespace) -> None:
    """zflux info: a snapshot folder component by component, or one checkpoint."""
    path = Path(args.path)
    if not (path / "model_index.json").is_file():
        print(path)
        print("\n".join("  " + line for line in identify(path).lines()))
        return
    class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    print(f"{path}: a diffusers {class_name} snapshot")
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        if folder.name == "scheduler":
            print(f"  scheduler/: {scheduler_line(folder)}")
        elif any(folder.glob("*.safetensors")):
            print(f"  {folder.name}/")
            print("\n".join("    " + line for line in identify(folder).lines()))


def scheduler_line(folder: Path) -> str:
    """The sampler settings of a snapshot's scheduler/ in words, with the Z-Image variant they imply."""
    scheduler = read_scheduler(folder)
    if scheduler.use_dynamic_shifting:
        return f"shift growing with the image size (mu from {scheduler.base_shift} to {scheduler.max_shift}): FLUX.1 dev's schedule"
    variant = variant_of(scheduler)
    return f"static shift {scheduler.shift}" + (f": {variant}'s schedule" if variant else "")


def convert(args: argparse.Namespace) -> None:
    """zflux convert: detect the family from the keys, rewrite the keys, save one .safetensors file."""
    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output {dst} must be a .safetensors file")
    info = identify(args.src)
    if info.family not in LAYOUTS:
        raise CheckpointError(f"{args.src} holds {info.description}; zflux convert handles Z-Image, FLUX.1, FLUX.2 and their autoencoders")
    layouts = LAYOUTS[info.family]
    original = layouts.from_diffusers(read_state_dict(args.src))  # accepts every layout
    converted = layouts.to_diffusers(original) if args.to == "diffusers" else original
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(converted, dst)
    print(f"{dst}: {len(converted)} tensors of {info.description}, {args.to} layout (read as {info.layout})")


if __name__ == "__main__":  # python -m zflux.cli (torchrun launches it this way)
    main()
