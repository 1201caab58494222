"""The `zflux` command: generate an image, say what a checkpoint is, convert between checkpoint layouts, train
zflux's own small models.

    zflux generate --prompt "a red circle on a blue background" --out circle.png   (zflux's small model, on the CPU)
    zflux generate --model z-image-turbo --weights Z-Image-Turbo --prompt "a red fox in snow" --out fox.png
    zflux generate --model flux-dev --weights FLUX.1-dev/flux1-dev.safetensors --prompt "a red fox in snow" --out fox.png
    zflux info FLUX.1-dev/flux1-dev.safetensors
    zflux convert Z-Image-Turbo/transformer z_image_turbo.safetensors --to original
    zflux train autoencoder --minutes 2 && zflux train z-image-turbo --minutes 3

`--weights` is a diffusers snapshot folder (model_index.json + subfolders) or a transformer
.safetensors file; without it, z-image-turbo and flux-dev run the small models zflux ships (128x128
pictures of coloured shapes, trained by `zflux train`); with a file, the autoencoder is `--vae` (default: ae.safetensors beside the file)
and the text encoders come from `--text-encoders` (default: the file's folder), a folder holding
text_encoder/ and tokenizer/ (FLUX.1: also text_encoder_2/ and tokenizer_2/), as in the models'
Hugging Face repositories.

The command knows the model families only through FAMILIES, each family's cli.py: its NAME, its
VARIANTS (the --model choices), its checkpoint LAYOUTS for `zflux convert`, the small models it ships
(EMBEDDED) and can train (TRAIN), the TEXT_FOLDERS a transformer file needs beside it, add_arguments
(its own flags), load_options (what its flags pass to load_pipeline), load_pipeline and
generate_options (what its flags pass to generate(), checked before loading). Adding a family is one
import and one entry.

The task inputs are flags of every family (--init-image, --mask, --strength, --control-image,
--control-preprocess, --reference-image); each family's generate_options reads the images and says
which of its models take them.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from zflux.common import vae as vae_layouts
from zflux.common.ops import BACKENDS
from zflux.common.identify import identify
from zflux.common.images import PREPROCESSORS, load_image, save_image
from zflux.common.pipeline import check_request, default_device, read_scheduler
from zflux.common.training import AUTOENCODER_SETTINGS, train_autoencoder
from zflux.common.weights import CheckpointError, read_state_dict, save_state_dict
from zflux.flux import cli as flux
from zflux.flux.flux2 import cli as flux2
from zflux.zimg import cli as zimage

FAMILIES = (zimage, flux, flux2)  # in --model order
VARIANTS = {name: variant for family in FAMILIES for name, variant in family.VARIANTS.items()}  # the --model choices
MODELS = {name: family for family in FAMILIES for name in family.VARIANTS}  # --model -> its family
LAYOUTS = {name: module for family in FAMILIES for name, module in family.LAYOUTS.items()} | {"autoencoder": vae_layouts}
EMBEDDED = {name: shipped for family in FAMILIES for name, shipped in family.EMBEDDED.items()}  # --model -> (folder, size)
TRAIN = {"autoencoder": (train_autoencoder, AUTOENCODER_SETTINGS)} | {n: t for family in FAMILIES for n, t in family.TRAIN.items()}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZE_MULTIPLE = 16  # pixels: the autoencoder's 8x times the 2x2 patches, for every model here


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `zflux` and its three subcommands."""
    names = [family.NAME for family in FAMILIES]
    parser = argparse.ArgumentParser(prog="zflux", description=f"{' and '.join(names)} text-to-image without diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--model", default="z-image-turbo", choices=tuple(VARIANTS), help="default: z-image-turbo")
    gen.add_argument("--weights", help="snapshot folder (model_index.json + subfolders) or transformer .safetensors file; default: "
                                       f"the small model zflux ships ({', '.join(EMBEDDED)} only)")
    gen.add_argument("--vae", help="with a transformer file: the autoencoder file (default: ae.safetensors beside it)")
    gen.add_argument("--text-encoders", help="with a transformer file: folder holding the text encoders' subfolders as the model's "
                                             "snapshot does (text_encoder/, tokenizer/, ...); default: the file's folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="what to steer away from, with classifier-free guidance (see each family's options)")
    gen.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024, the small models' 128, or the init image's)")
    gen.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024, the small models' 128, or the init image's)")
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
    gen.add_argument("--dtype", choices=DTYPES, help="default: bf16; fp32 for the small models (faster on the CPU)")
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

    train = commands.add_parser("train", help="train zflux's small models on drawn scenes (a run resumes where the last stopped)")
    train.add_argument("what", choices=tuple(TRAIN), help="the autoencoder first: the transformers learn its latents")
    train.add_argument("--out", default="out/train", help="runs folder: <out>/<what>/ gets the checkpoint, loss.png, sample "
                                                          "pictures, grid.png and model/ (the diffusers folder); default out/train")
    train.add_argument("--minutes", type=float, help="stop this chunk after so many minutes of training, then save (default 8)")
    train.add_argument("--max-steps", type=int, help="the step at which the run ends for good")
    train.add_argument("--batch-size", type=int, help="default: autoencoder 64, transformers 128")
    train.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train.add_argument("--size", type=int, default=128, help="picture size in pixels (default 128, the shipped models')")
    train.add_argument("--vae", help="a transformer's trained autoencoder, a vae/ folder (default <out>/autoencoder/model)")
    train.add_argument("--init", help="a transformer's starting weights: a snapshot of the same model (e.g. the shipped one, to "
                                      "train it further on a fresh machine); a checkpoint in the run folder wins")
    train.add_argument("--device", help="default: cuda when available, else cpu")
    train.add_argument("--workers", type=int, help="processes drawing pictures (default: 0 on the CPU, up to 8 with a GPU)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=train_model)
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
    if args.weights is None:
        args.weights, size = embedded_model(args.model)
        args.height, args.width, args.dtype = args.height or size, args.width or size, args.dtype or "fp32"
        print(f"model: zflux's small {args.model}-shaped model, trained on {size}x{size} pictures of coloured shapes "
              f"({args.weights}); pass --weights for the real one")
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


def embedded_model(model: str) -> tuple[Path, int]:
    """The snapshot folder and picture size of the small model zflux ships for `model`, run when --weights is not given."""
    if model not in EMBEDDED:
        raise ValueError(f"--model {model} needs --weights: zflux ships small models for {', '.join(EMBEDDED)} only")
    folder, size = EMBEDDED[model]
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"zflux's small {model} is not in this installation ({folder} is missing): pass --weights, "
                              f"or train it (zflux train autoencoder, then zflux train {model})")
    return folder, size


def load_pipeline(args: argparse.Namespace, family: ModuleType):
    """The pipeline for --model from --weights (snapshot folder, or transformer file + --vae + --text-encoders), built by `family`."""
    options = dict(variant=args.model, device=args.device, dtype=DTYPES[args.dtype or "bf16"],
                   offload_text_encoder=args.offload_text_encoder, **family.load_options(args))
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


def train_model(args: argparse.Namespace) -> None:
    """zflux train: one chunk of a run (it resumes from <out>/<what>/), then where its results are."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 work outside autocast
        torch.backends.cudnn.benchmark = True  # the autoencoder's convolutions, at one fixed size
    run, defaults = TRAIN[args.what]
    given = dict(minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    settings = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    workers = args.workers if args.workers is not None else (min(8, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0)
    folder = Path(args.out) / args.what
    options = dict(size=args.size, device=device, workers=workers)
    if args.what == "autoencoder":
        if args.init or args.vae:
            raise ValueError("--init and --vae go with a transformer's run (the autoencoder is trained from scratch)")
        model = run(folder, settings, **options)
    else:
        vae = Path(args.vae) if args.vae else Path(args.out) / "autoencoder" / "model"
        if not (vae / "config.json").is_file():
            raise CheckpointError(f"no trained autoencoder at {vae}: run `zflux train autoencoder` first, or pass --vae")
        model = run(folder, vae, settings, init=Path(args.init) if args.init else None, **options)
    print(f"{model}: {args.what} (diffusers folder); {folder}: checkpoint, loss.png, sample pictures"
          + ("" if args.what == "autoencoder" else ", grid.png"))


if __name__ == "__main__":  # python -m zflux.cli (torchrun launches it this way)
    main()
