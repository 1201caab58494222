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

The command knows the model families only through FAMILIES, each family's cli.py: its NAME, its
VARIANTS (the --model choices), its checkpoint LAYOUTS for `zflux convert`, the TEXT_FOLDERS a
transformer file needs beside it, add_arguments (its own flags), load_options (what its flags pass to
load_pipeline), load_pipeline and generate_options (what its flags pass to generate(), checked before
loading). Adding a family is one import and one entry.

The task inputs are flags of every family (--init-image, --mask, --strength, --control-image,
--control-preprocess, --reference-image); each family's generate_options reads the images and says
which of its models take them.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from zflux.common import vae as vae_layouts
from zflux.common.ops import BACKENDS
from zflux.common.identify import identify
from zflux.common.images import PREPROCESSORS, load_image, save_image
from zflux.common.pipeline import check_request, read_scheduler
from zflux.common.weights import CheckpointError, read_state_dict, save_state_dict
from zflux.flux import cli as flux
from zflux.flux.flux2 import cli as flux2
from zflux.zimg import cli as zimage

FAMILIES = (zimage, flux, flux2)  # in --model order
VARIANTS = {name: variant for family in FAMILIES for name, variant in family.VARIANTS.items()}  # the --model choices
MODELS = {name: family for family in FAMILIES for name in family.VARIANTS}  # --model -> its family
LAYOUTS = {name: module for family in FAMILIES for name, module in family.LAYOUTS.items()} | {"autoencoder": vae_layouts}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZE_MULTIPLE = 16  # pixels: the autoencoder's 8x times the 2x2 patches, for every model here


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `zflux` and its three subcommands."""
    names = [family.NAME for family in FAMILIES]
    parser = argparse.ArgumentParser(prog="zflux", description=f"{' and '.join(names)} text-to-image without diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--model", required=True, choices=tuple(VARIANTS))
    gen.add_argument("--weights", required=True, help="snapshot folder (model_index.json + subfolders) or transformer .safetensors file")
    gen.add_argument("--vae", help="with a transformer file: the autoencoder file (default: ae.safetensors beside it)")
    gen.add_argument("--text-encoders", help="with a transformer file: folder holding the text encoders' subfolders as the model's "
                                             "snapshot does (text_encoder/, tokenizer/, ...); default: the file's folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="what to steer away from, with classifier-free guidance (see each family's options)")
    gen.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024, or the init image's height)")
    gen.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024, or the init image's width)")
    gen.add_argument("--steps", type=int, help="default: " + ", ".join(f"{name} {v.defaults.steps}" for name, v in VARIANTS.items()))
    gen.add_argument("--guidance", type=float, help="the guidance scale (what it means and its default: see each family's options)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--init-image", help="image file to start from (image-to-image, inpainting)")
    gen.add_argument("--strength", type=float, help="image-to-image and inpainting: how much of the schedule to run (0-1; default "
                                                    "the task's, see each family's options)")
    gen.add_argument("--mask", help="with --init-image: the inpainting mask, white = repaint, the image's size (see each family's options)")
    gen.add_argument("--control-image", help="control models: the control image (edges, depth map, ...), or a photo with "
                                             "--control-preprocess")
    gen.add_argument("--control-preprocess", "--preprocess", choices=tuple(PREPROCESSORS),
                     help="make the control image from the photo given as --control-image first (Canny 50/200)")
    gen.add_argument("--reference-image", action="append", metavar="PATH",
                     help="an image to edit or take subjects from (repeatable; see each family's options)")
    gen.add_argument("--out", required=True, help="output image file, e.g. image.png")
    gen.add_argument("--device", help="default: cuda when available, else cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="bf16")
    gen.add_argument("--offload-text-encoder", action="store_true", help="keep the text encoder on the CPU between prompts")
    gen.add_argument("--backend", choices=BACKENDS, help="attention / norm kernels (default: $ZFLUX_BACKEND or auto)")
    for family in FAMILIES:
        family.add_arguments(gen)
    gen.set_defaults(run=generate)

    info = commands.add_parser("info", help="say what a checkpoint file, folder or snapshot holds (reads headers only)")
    info.add_argument("path")
    info.set_defaults(run=describe)

    conv = commands.add_parser("convert", help=f"convert a {' / '.join(names)} transformer or their autoencoder between layouts")
    conv.add_argument("src", help="checkpoint file, index or folder (any layout)")
    conv.add_argument("dst", help="output .safetensors file")
    conv.add_argument("--to", choices=("original", "diffusers"), default="original",
                      help="original: the official single-file layout each model was released in")
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

    family = MODELS[args.model]
    family_options = family.generate_options(args)  # its flags checked, and their files read, before minutes of loading
    start = time.perf_counter()
    pipe = load_pipeline(args, family)
    if args.backend:
        pipe.transformer.backend = args.backend
    loaded = time.perf_counter() - start

    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, steps=args.steps,
                   guidance=args.guidance, seed=args.seed, init_image=init_image)
    if args.strength is not None:  # else the task's default, which each pipeline knows
        options["strength"] = args.strength
    start = time.perf_counter()
    image = pipe.generate(args.prompt, **options, **family_options)
    took = time.perf_counter() - start
    path = save_image(image, args.out)
    print(f"{path}: {image.width}x{image.height}, {pipe.variant}, seed {args.seed}; generated in {took:.2f} s "
          f"(weights loaded in {loaded:.1f} s)")


def load_pipeline(args: argparse.Namespace, family: ModuleType):
    """The pipeline for --model from --weights (snapshot folder, or transformer file + --vae + --text-encoders), built by `family`."""
    options = dict(variant=args.model, device=args.device, dtype=DTYPES[args.dtype], offload_text_encoder=args.offload_text_encoder,
                   **family.load_options(args))
    weights = Path(args.weights)
    if weights.is_dir():
        if args.vae or args.text_encoders:
            raise ValueError("--vae and --text-encoders go with a transformer file; --weights is a folder (a snapshot brings its own)")
        return family.load_pipeline(weights, **options)
    if not weights.is_file():
        raise CheckpointError(f"no weights at {weights}")
    vae = Path(args.vae) if args.vae else weights.parent / "ae.safetensors"
    if not vae.exists():
        raise CheckpointError(f"no autoencoder at {vae}: pass --vae (the ae.safetensors file)")
    encoders = Path(args.text_encoders) if args.text_encoders else weights.parent
    needed = family.TEXT_FOLDERS
    missing = [f"{name}/" for name in needed if not (encoders / name).is_dir()]
    if missing:
        raise CheckpointError(f"{encoders} lacks the text-encoder subfolder(s) {', '.join(missing)}: pass --text-encoders, a folder "
                              f"holding {', '.join(n + '/' for n in needed)} (e.g. the model's diffusers snapshot)")
    return family.load_pipeline(weights, vae=vae, text_encoders=encoders, **options)


def describe(args: argparse.Namespace) -> None:
    """zflux info: a snapshot folder component by component, or one checkpoint."""
    path = Path(args.path)
    if not (path / "model_index.json").is_file():
        print(path)
        print("\n".join("  " + line for line in identify(path).lines()))
        return
    class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    print(f"{path}: a diffusers {class_name} snapshot")
    transformer = path / "transformer"
    family = identify(transformer).family if any(transformer.glob("*.safetensors*")) else None
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        if folder.name == "scheduler":
            print(f"  scheduler/: {scheduler_line(folder, family)}")
        elif any(folder.glob("*.safetensors")):
            print(f"  {folder.name}/")
            print("\n".join("    " + line for line in identify(folder).lines()))


def scheduler_line(folder: Path, family: str | None = None) -> str:
    """The sampler settings of a snapshot's scheduler/ in words, with the variants that ship exactly these (of the
    transformer's `family`, identify()'s name, where known: FLUX.1 dev and FLUX.2 ship the same config)."""
    scheduler = read_scheduler(folder)
    if scheduler.use_dynamic_shifting:
        line = f"shift growing with the image size (mu from {scheduler.base_shift} to {scheduler.max_shift})"
    else:
        line = f"static shift {scheduler.shift}"
    shipped = [name for name, variant in VARIANTS.items()
               if variant.scheduler == scheduler and (family is None or family in MODELS[name].LAYOUTS)]
    return line + (f": {' or '.join(shipped)}'s schedule" if shipped else "")


def convert(args: argparse.Namespace) -> None:
    """zflux convert: detect the family from the keys, rewrite the keys, save one .safetensors file."""
    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output {dst} must be a .safetensors file")
    info = identify(args.src)
    if info.family not in LAYOUTS:
        names = ", ".join(family.NAME for family in FAMILIES)
        raise CheckpointError(f"{args.src} holds {info.description}; zflux convert handles {names} and their autoencoder")
    layouts = LAYOUTS[info.family]
    original = layouts.from_diffusers(read_state_dict(args.src))  # accepts every layout
    converted = layouts.to_diffusers(original) if args.to == "diffusers" else original
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(converted, dst)
    print(f"{dst}: {len(converted)} tensors of {info.description}, {args.to} layout (read as {info.layout})")


if __name__ == "__main__":  # python -m zflux.cli (torchrun launches it this way)
    main()
