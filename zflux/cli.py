"""The `zflux` command: generate images, say what a checkpoint or an image holds, convert between checkpoint layouts,
train zflux's own small models.

    zflux generate --prompt "a red circle on a blue background" --out circle.png   (zflux's small model, on the CPU)
    zflux generate --model z-image-turbo --weights Z-Image-Turbo --prompt "a red fox in snow" --out fox.png
    zflux generate --model flux-dev --weights FLUX.1-dev/flux1-dev.safetensors --prompt "a red fox in snow" --out fox.png
    zflux generate --model flux-schnell --weights FLUX.1-schnell --prompts prompts.txt --num-images 4 --out foxes/fox.png
    zflux info FLUX.1-dev/flux1-dev.safetensors          (or a snapshot folder, or an image zflux wrote)
    zflux convert Z-Image-Turbo/transformer z_image_turbo.safetensors --to original
    zflux train autoencoder --minutes 2 && zflux train z-image-turbo --minutes 3

`--weights` is a diffusers snapshot folder (model_index.json + subfolders) or a transformer
.safetensors file; without it, z-image-turbo and flux-dev run the small models zflux ships (128x128
pictures of coloured shapes, trained by `zflux train`); with a file, the autoencoder is `--vae` (default: ae.safetensors beside the file)
and the text encoders come from `--text-encoders` (default: the file's folder), a folder holding
text_encoder/ and tokenizer/ (FLUX.1: also text_encoder_2/ and tokenizer_2/), as in the models'
Hugging Face repositories.

The command knows the model families only through families(), each family's cli.py: its NAME, its
VARIANTS (the --model choices), its checkpoint LAYOUTS for `zflux convert`, the small models it ships
(EMBEDDED) and can train (TRAIN), the TEXT_FOLDERS a transformer file needs beside it, add_arguments
(its own flags), check_args (its own checks), cfg_rows (the rows a transformer call carries), parallel_limits (what --parallel may split),
load_options (what its flags pass to load_pipeline), load_pipeline and generate_options (what its
flags pass to generate(), their files read). Adding a family is one import and one entry.

The task inputs are flags of every family (--init-image, --mask, --strength, --control-image,
--control-preprocess, --reference-image); each family's check_args (or generate_options) says which
of its models take them, and its generate_options reads the images.

Every check before any weight is read
-------------------------------------
`zflux generate` reads no weight until the whole request has passed these, in this order:

1. argparse: types and choices (Parser.error: one line, no usage dump);
2. check_generate, the flags every family shares: numbers finite, flags of another family refused
   by name, the prompts (--prompt, or --prompts FILE), the seed, --num-images, the output files
   (a format Pillow writes, a folder that exists or can be made), --strength only with
   --init-image, the init image (opened now), the size (positive multiples of 16: the given one,
   else the init image's, else 1024, as the pipelines settle it), a guidance >= 0;
3. family.check_args(args, height, width): the chosen family's own rules (what applies to which
   variant, the largest size its positions allow, ...) for that size; it returns the sampling
   settings the run will use.
   Then family.generate_options(args): the family's flags as generate() takes them, checked, and
   their files (control images, masks, reference images) opened, so that they fail now;
4. the schedule those settings make (steps >= 1, a strength that leaves a step to run), the
   device (there, with CUDA if asked, able to compute in --dtype; --precision fp8 with bf16 where
   fp8 GEMMs run, a warning where they do not), --parallel (a mode this run can use: CFG rows to
   split, heads for the shards, an image per rank; launched by torchrun with a GPU per process;
   family.parallel_limits refuses the tasks it cannot split), the backend (Triton only where it
   runs), and the memory: an estimate from the checkpoints' headers (common/memory.py), refused
   with advice when the device is clearly short;
5. loading: the snapshot's folders, each checkpoint's family, then every key and shape against the
   model, from the headers (the pipelines' from_single_files); only then are weights read.

To add a flag, say --mask to a family: add it in the family's add_arguments with default None (so
that "not given" shows); check it in the family's check_args, raising ValueError with one line that
names the flag and its value (compare sizes with the height and width it is given); pass
it on in generate_options, opening its file there (common.images.load_image: a missing or unreadable
file is one line) or in load_options. With a --model of another family the flag is refused by name,
with no code. A flag several families take goes in add_generate_arguments and check_generate here.

A ValueError (CheckpointError included), OSError, MemoryError (CUDA out of memory, turned into one
with advice) or FloatingPointError (NaN latents: common.pipeline.DivergedError) ends a command with one line on
stderr and exit status 1 (2: a usage error; 130: Ctrl-C); warnings (the `warnings` module: a prompt
cut to its encoder's limit, say) print one line each. Anything else is a bug and keeps its traceback.
Outputs are written whole or not at all (common/files.py: atomic_write).

This module imports no torch: `zflux --help` and `zflux info CHECKPOINT` (headers only) take well
under a second; the families (torch, transformers: seconds) are imported when generate's or train's
flags are parsed or a command needs them. FAMILIES, VARIANTS, LAYOUTS, EMBEDDED and TRAIN are made
on first use (module __getattr__), each once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterator

from zflux import __version__
from zflux.common.files import PICKLE_SUFFIXES, CheckpointError, check_writable, safetensors_files
from zflux.common.identify import identify
from zflux.common.lora_files import is_lora, read_lora

if TYPE_CHECKING:  # imported where a command needs them (the module's docstring says why)
    import torch
    from PIL import Image

    from zflux.common.memory import Footprint
    from zflux.common.sampling import SamplingDefaults

DTYPES = ("bf16", "fp16", "fp32")
PRECISIONS = ("fp8",)  # common/fp8.py PRECISIONS (named here too: this module imports no torch)
OFFLOAD = ("none", "text-encoder", "model", "blocks", "auto")  # common.offload.MODES, and auto (named here: no torch import)
SIZE_MULTIPLE = 16  # pixels: the autoencoder's 8x times the 2x2 patches, for every model here
RANDOM_SEED = -1
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
RANDOM_SEEDS = 2**32  # a random seed is drawn below this: short to write down


@cache
def families() -> tuple[ModuleType, ...]:
    """Each family's cli.py, in --model order. Imported on first use: they bring torch and transformers (seconds)."""
    from zflux.flux import cli as flux
    from zflux.flux.flux2 import cli as flux2
    from zflux.zimg import cli as zimage

    return zimage, flux, flux2


@cache
def variants() -> dict:
    """Every --model choice: name -> its family's Variant."""
    return {name: variant for family in families() for name, variant in family.VARIANTS.items()}


@cache
def embedded() -> dict[str, tuple[Path, int]]:
    """The small models zflux ships: --model -> (snapshot folder, picture size), run when --weights is not given."""
    return {name: shipped for family in families() for name, shipped in family.EMBEDDED.items()}


@cache
def trainable() -> dict:
    """What `zflux train` trains: name -> (the run, its default settings); the autoencoder first."""
    from zflux.common.training import AUTOENCODER_SETTINGS, train_autoencoder

    return {"autoencoder": (train_autoencoder, AUTOENCODER_SETTINGS)} | {n: t for family in families() for n, t in family.TRAIN.items()}


@cache
def layouts() -> dict[str, ModuleType]:
    """zflux convert's layouts: identify()'s family name -> the module with its key maps (each family's, and the autoencoder's)."""
    from zflux.common import vae

    return {name: module for family in families() for name, module in family.LAYOUTS.items()} | {"autoencoder": vae}


def family_of(model: str) -> ModuleType:
    return next(family for family in families() if model in family.VARIANTS)


def __getattr__(name: str):
    """FAMILIES, VARIANTS, LAYOUTS, EMBEDDED and TRAIN as module attributes too, made on first use (the families' import
    takes seconds), each once: a test may patch their entries."""
    lazy = {"FAMILIES": families, "VARIANTS": variants, "LAYOUTS": layouts, "EMBEDDED": embedded, "TRAIN": trainable}
    if name not in lazy:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return lazy[name]()


@cache
def family_flags(family: ModuleType) -> dict[str, object]:
    """A family's own flags of `zflux generate`, dest -> default, read off a parser that holds only them."""
    probe = argparse.ArgumentParser(add_help=False)
    family.add_arguments(probe)
    return vars(probe.parse_args([]))


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line, and arguments that may be added on first use (`fill`), so that a
    command that does not need them (`zflux --help`, `zflux info`) never imports what they are made from."""

    def __init__(self, *args, fill: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fill = fill

    def _filled(self) -> None:
        if self.fill is not None:
            fill, self.fill = self.fill, None
            fill(self)

    def parse_known_args(self, args=None, namespace=None):
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._filled()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `zflux` and its three subcommands (generate's flags are added when it is used)."""
    parser = Parser(prog="zflux", description="Z-Image and FLUX text-to-image diffusion transformers in plain PyTorch, "
                                              "without diffusers.")
    parser.add_argument("--version", action="version", version=f"zflux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.add_parser("generate", help="generate images from prompts", description="Generate images from prompts.",
                        fill=add_generate_arguments)

    info = commands.add_parser("info", help="say what a checkpoint (file, folder, snapshot) or an image zflux wrote holds",
                               description="Say what a checkpoint holds (reading headers only), or an image's generation settings.")
    info.add_argument("path", help="a .safetensors file, index or folder, a diffusers snapshot folder, or an image")
    info.set_defaults(run=describe)

    conv = commands.add_parser("convert", help="convert a transformer or the autoencoder between checkpoint layouts",
                               description="Convert a transformer or the autoencoder between checkpoint layouts.")
    conv.add_argument("src", help="checkpoint file, index or folder (any layout)")
    conv.add_argument("dst", help="output .safetensors file")
    conv.add_argument("--to", choices=("original", "diffusers"), default="original",
                      help="original: the official single-file layout each model was released in (default: %(default)s)")
    conv.set_defaults(run=convert)

    commands.add_parser("train", help="train zflux's small models on drawn scenes (a run resumes where the last stopped)",
                        description="Train zflux's small models on drawn scenes (a run resumes where the last stopped).",
                        fill=add_train_arguments)
    return parser


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """`zflux generate`'s flags: the shared ones, then each family's group."""
    from zflux.common.images import PREPROCESSORS
    from zflux.common.ops import BACKENDS
    from zflux.common.parallel import MODES

    models = "; ".join(f"{name}: {v.defaults.steps} steps, guidance {v.defaults.guidance}" for name, v in variants().items())
    gen.add_argument("--model", default="z-image-turbo", choices=tuple(variants()),
                     help=f"the model variant (default: %(default)s; {models})")
    gen.add_argument("--weights", help="snapshot folder (model_index.json + subfolders) or transformer .safetensors file; default: "
                                       f"the small model zflux ships ({', '.join(embedded())} only)")
    gen.add_argument("--vae", help="with a transformer file: the autoencoder file (default: ae.safetensors beside it)")
    gen.add_argument("--text-encoders", help="with a transformer file: folder holding the text encoders' subfolders as the model's "
                                             "snapshot does (text_encoder/, tokenizer/, ...); default: the file's folder")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="what the image should show")
    prompts.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line: an image (or --num-images) each")
    gen.add_argument("--negative-prompt", help="what to steer away from, with classifier-free guidance (see each family's options)")
    gen.add_argument("--height", type=int, help="pixels, a positive multiple of 16 (default 1024, the small models' 128, or the "
                                                "init image's)")
    gen.add_argument("--width", type=int, help="pixels, a positive multiple of 16 (default 1024, the small models' 128, or the "
                                               "init image's)")
    gen.add_argument("--steps", type=int, help="denoising steps, at least 1 (default: the model's, see --model)")
    gen.add_argument("--guidance", type=float, help="the guidance scale, >= 0 (its meaning and default: see each family's options)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise, 0 to 2^64-1; -1: a random one. The default, 0, "
                                                         "makes the same image every run. The seed used is printed and stored in the PNG")
    gen.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt, with seeds seed, seed+1, ... "
                                                                            "(default 1)")
    gen.add_argument("--init-image", help="image file to start from (image to image, inpainting)")
    gen.add_argument("--strength", type=float, help="with --init-image: how much of the schedule to run, 0-1 (default: the task's, "
                                                    "see each family's options)")
    gen.add_argument("--mask", help="with --init-image: the inpainting mask, white = repaint, the image's size (see each family's options)")
    gen.add_argument("--control-image", help="control models: the control image (edges, depth map, ...), or a photo with "
                                             "--control-preprocess")
    gen.add_argument("--control-preprocess", "--preprocess", choices=tuple(PREPROCESSORS),
                     help="make the control image from the photo given as --control-image first (Canny 50/200)")
    gen.add_argument("--reference-image", action="append", metavar="PATH",
                     help="an image to edit or take subjects from (repeatable; see each family's options)")
    gen.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                     help="a LoRA .safetensors file for the model, at SCALE (default 1.0), fused into the weights; repeatable: "
                          "the LoRAs add up (see README: LoRA)")
    gen.add_argument("--out", required=True, help="output image file, e.g. image.png (PNG keeps the settings); several images are "
                                                  "numbered: image-1.png, image-2.png, ...")
    gen.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    gen.add_argument("--dtype", choices=DTYPES, help="precision of the weights and the model's compute (default: bf16; fp32 for the "
                                                     "small models, faster on the CPU; fp16 can overflow)")
    gen.add_argument("--precision", choices=PRECISIONS, help="fp8: the transformer blocks' linears in e4m3 with per-channel / "
                                                            "per-token scales (fast on GPUs of compute capability 8.9+: Ada, "
                                                            "Hopper; a slow fp32 reference elsewhere); --dtype stays the dtype "
                                                            "of everything else")
    gen.add_argument("--offload", choices=OFFLOAD,
                     help="for GPUs smaller than the model: text-encoder (on the CPU between prompts), model (each of text "
                          "encoder and transformer on the GPU only while it runs), blocks (as model, the transformer streamed block "
                          "by block), auto (the least of these that the memory estimate says fits); default none")
    gen.add_argument("--offload-text-encoder", action="store_true", help="the same as --offload text-encoder")
    gen.add_argument("--vae-tiling", action="store_true", default=None,
                     help="decode in overlapping tiles (default: only when the whole image would not fit in GPU memory)")
    gen.add_argument("--cache", type=float, metavar="THRESHOLD",
                     help="first-block step cache: skip the transformer's later blocks on steps whose first block changed by less "
                          "than THRESHOLD (relative L1; e.g. 0.1); faster, a little different; default off")
    gen.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                     help="replay each denoising step's transformer call (and Z-Image's prompt encode) as a CUDA graph, captured "
                          "once per size (default on; GPU only)")
    gen.add_argument("--backend", choices=BACKENDS, help="attention / norm kernels (default: $ZFLUX_BACKEND or auto)")
    gen.add_argument("--parallel", choices=MODES, help="under torchrun --nproc-per-node N, one process per GPU: sp splits each "
                                                       "image's tokens, cfg the guided rows (2 processes; cfg+sp: 2 x N/2), "
                                                       "dp the images")
    for family in families():
        family.add_arguments(gen)
    gen.set_defaults(run=generate)


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """`zflux train`'s flags."""
    train.add_argument("what", choices=tuple(trainable()), help="the autoencoder first: the transformers learn its latents")
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `zflux` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return
    try:
        with warnings.catch_warnings():  # restores the warnings module's state on the way out (main may run in-process)
            warnings.simplefilter("always")  # each prompt cut short is worth its own line
            warnings.showwarning = lambda message, *_, **__: print(f"zflux {args.command}: warning: {message}", file=sys.stderr)
            args.run(args)
    except KeyboardInterrupt:
        print(f"zflux {args.command}: interrupted (nothing half-written is left)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, MemoryError, FloatingPointError) as e:  # named by the code that found it, in one line
        sys.exit(f"zflux {args.command}: error: {e}")


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    seed: int
    out: Path


@dataclass(frozen=True)
class Request:
    """A checked `zflux generate`: what it will make and how, settled before anything loads."""

    jobs: list[Job]
    settings: SamplingDefaults  # the family's, the given flags in place
    family_options: dict  # family.generate_options(args): its flags as generate() takes them, files opened
    init_image: Image.Image | None
    device: torch.device
    dtype: torch.dtype
    footprint: Footprint
    loras: list[tuple[Path, float]]  # --lora files and scales, their headers checked
    offload: str  # the offload mode (--offload auto: the one chosen)


def generate(args: argparse.Namespace) -> None:
    """zflux generate: check the request, load the pipeline, generate and save each image, report the seed and time of each."""
    from zflux.common.images import save_image
    from zflux.common.parallel import session

    family = family_of(args.model)
    if args.weights is None:
        args.weights, size = embedded_model(args.model)
        args.height = size if args.height is None else args.height
        args.width = size if args.width is None else args.width
        args.dtype = args.dtype or "fp32"
        print(f"model: zflux's small {args.model}-shaped model, trained on {size}x{size} pictures of coloured shapes "
              f"({args.weights}); pass --weights for the real one")
    args.dtype = args.dtype or "bf16"
    request = check_generate(args, family)
    start = time.perf_counter()
    with memory_reported(args, request), session(args.parallel, request.device) as plan:
        pipe = load_pipeline(args, family, request)
        loaded = f" (weights loaded in {time.perf_counter() - start:.1f} s)"
        options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, steps=args.steps,
                       guidance=args.guidance, init_image=request.init_image, strength=args.strength, cache=args.cache,
                       vae_tiling=args.vae_tiling)  # unset: the pipeline's
        with plan.applied(pipe.transformer):
            for job in plan.share(request.jobs):
                start = time.perf_counter()
                image = pipe.generate(job.prompt, seed=job.seed, **{k: v for k, v in options.items() if v is not None},
                                      **request.family_options, progress=plan.writes)  # one bar per image made
                took = time.perf_counter() - start
                if plan.writes:  # sp, cfg: every rank holds the same image
                    path = save_image(image, job.out, parameters=parameters_text(args, family, request, job, image.size))
                    print(f"{path}: {image.width}x{image.height}, {pipe.variant}, seed {job.seed}; generated in {took:.2f} s{loaded}")
                loaded = ""


def embedded_model(model: str) -> tuple[Path, int]:
    """The snapshot folder and picture size of the small model zflux ships for `model`, run when --weights is not given."""
    if model not in embedded():
        raise ValueError(f"--model {model} needs --weights: zflux ships small models for {', '.join(embedded())} only")
    folder, size = embedded()[model]
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"zflux's small {model} is not in this installation ({folder} is missing): pass --weights, "
                              f"or train it (zflux train autoencoder, then zflux train {model})")
    return folder, size


def check_generate(args: argparse.Namespace, family: ModuleType) -> Request:
    """Every check of a generate request that needs no weight (steps 2 to 4 of the module's docstring); the request, settled."""
    from zflux.common.images import check_image_path
    from zflux.common.memory import check_device, check_dtype
    from zflux.common.ops import triton_runs_on
    from zflux.common.parallel import check_mode, launched, rank_device
    from zflux.common.pipeline import check_request
    from zflux.common.sampling import img2img_start, sigma_schedule

    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(dest)} {value}: give a finite number")
    check_other_families_flags(args, family)
    prompts = read_prompts(args)
    seed = check_seed(args.seed)
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: make at least 1")
    count = len(prompts) * args.num_images
    jobs = [Job(prompt, seed + k, numbered(Path(args.out), i * args.num_images + k, count))
            for i, prompt in enumerate(prompts) for k in range(args.num_images)]
    for job in jobs:
        check_image_path(job.out)
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength goes with --init-image (image to image): add one, or leave --strength out")
    height, width, init_image = check_request(prompts[0], args.height, args.width, SIZE_MULTIPLE, init_image=args.init_image)
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance {args.guidance}: the guidance scale is >= 0")

    settings = family.check_args(args, height, width)
    family_options = family.generate_options(args)
    loras = check_loras(args.lora or [], family)
    sigmas = sigma_schedule(settings.steps)  # steps >= 1
    if args.strength is not None:  # else the pipeline's default
        img2img_start(sigmas, args.strength)  # in [0, 1], and leaving a step to run
    device = check_device(args.device)
    if args.parallel:
        if args.seed == RANDOM_SEED:
            raise ValueError("--seed -1 with --parallel: each process would draw a random seed of its own; give one (e.g. --seed 7)")
        if args.cache is not None and args.parallel != "dp":
            raise ValueError(f"--cache with --parallel {args.parallel}: each process would decide alone which steps to skip, on its "
                             "own share of the tokens or rows; use --parallel dp, or leave --cache out")
        guided, heads = family.parallel_limits(args, settings)
        check_mode(args.parallel, launched()[1], guided=guided, heads=heads, images=len(jobs))
        device = rank_device(device)
    dtype = torch_dtype(args.dtype)
    check_dtype(dtype, device)
    if args.backend == "triton" and not triton_runs_on(device):
        raise ValueError(f"--backend triton: the Triton kernels run on a CUDA GPU with triton installed, not on {device}; "
                         "leave --backend out (auto) or use sdpa")
    if args.precision == "fp8":
        check_fp8(device, args.dtype)
    if args.cache is not None and args.cache < 0:
        raise ValueError(f"--cache {args.cache}: the threshold is >= 0 (0 never skips a step; try 0.1)")
    if args.offload_text_encoder and args.offload not in (None, "text-encoder"):
        raise ValueError(f"--offload-text-encoder is --offload text-encoder: it cannot go with --offload {args.offload}")
    offload = "text-encoder" if args.offload_text_encoder else args.offload or "none"
    if offload not in ("none", "auto") and device.type == "cpu":
        warnings.warn(f"--offload {offload} does nothing on the CPU: everything is there already")
    rows = 1 if args.parallel and "cfg" in args.parallel else family.cfg_rows(args, settings)  # --parallel cfg: a row each
    footprint, offload = check_memory(args, family, device=device, dtype=dtype, size=(height, width), offload=offload, rows=rows)
    return Request(jobs=jobs, settings=settings, family_options=family_options, init_image=init_image, device=device, dtype=dtype,
                   footprint=footprint, loras=loras, offload=offload)


def check_loras(flags: list[str], family: ModuleType) -> list[tuple[Path, float]]:
    """--lora FILE[:SCALE] flags: each file a LoRA (from its header) that does not look made for another family."""
    from zflux.common.identify import FAMILY_NAMES
    from zflux.common.lora_files import lora_flag

    loras = [lora_flag(text) for text in flags]
    for path, _ in loras:
        looks = read_lora(path).family
        if looks != "unknown" and looks not in family.LAYOUTS:
            raise ValueError(f"--lora {path}: a {FAMILY_NAMES[looks]} LoRA; --model {family.NAME} needs one of its own")
    return loras


def check_fp8(device: torch.device, dtype: str) -> None:
    """--precision fp8 on `device`: bf16 outputs where fp8 GEMMs run; a warning where they do not (the slow reference path)."""
    import torch

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability >= (8, 9) and dtype != "bf16":
        raise ValueError(f"--precision fp8 with --dtype {dtype}: the fp8 GEMMs write bf16; use --dtype bf16 (or leave it out)")
    if capability is None or capability < (8, 9):
        where = "the CPU" if capability is None else f"{device} (compute capability {capability[0]}.{capability[1]} < 8.9)"
        warnings.warn(f"--precision fp8 on {where}: no fp8 tensor cores, so the fp8 linears run through the fp32 reference "
                      "path (dequantize, matmul in fp32), slower than --dtype alone")


def check_other_families_flags(args: argparse.Namespace, family: ModuleType) -> None:
    """Refuse, by name, a flag of another family than --model's: it would do nothing."""
    for other in families():
        given = [dest for dest, default in family_flags(other).items() if other is not family and getattr(args, dest) != default]
        if given:
            raise ValueError(f"{flag(given[0])} is a {other.NAME} option ({', '.join(other.VARIANTS)}); {args.model} does not take it")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or the lines of --prompts FILE that hold some text."""
    if args.prompts is None:
        return [args.prompt]
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompts {args.prompts}: {getattr(e, 'strerror', None) or e}") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts} holds no prompt (one a line)")
    return prompts


def check_seed(seed: int) -> int:
    """The seed to use: `seed`, or a random one for RANDOM_SEED."""
    if seed == RANDOM_SEED:
        return secrets.randbelow(RANDOM_SEEDS)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed}: use 0 to {MAX_SEED}, or {RANDOM_SEED} for a random seed")
    return seed


def numbered(out: Path, index: int, count: int) -> Path:
    """The file of image `index` (from 0) of `count`: `out` itself for one image, else out-1.png, out-2.png, ... (zero-padded)."""
    if count == 1:
        return out
    return out.with_name(f"{out.stem}-{index + 1:0{len(str(count))}d}{out.suffix}")


def components(args: argparse.Namespace, family: ModuleType) -> tuple[Path, Path | None, Path | None]:
    """(--weights, its autoencoder file, its text-encoder folder), checked to be there; (folder, None, None) for a snapshot."""
    weights = Path(args.weights)
    if weights.is_dir():
        if args.vae or args.text_encoders:
            raise ValueError("--vae and --text-encoders go with a transformer file; --weights is a folder (a snapshot brings its own)")
        return weights, None, None
    if not weights.is_file():
        raise CheckpointError(f"no weights at {weights}")
    safetensors_files(weights)  # a pickle (.bin, .ckpt, ...) is refused, with how to convert it
    vae = Path(args.vae) if args.vae else weights.parent / "ae.safetensors"
    if not vae.exists():
        raise CheckpointError(f"no autoencoder at {vae}: pass --vae (the ae.safetensors file)")
    encoders = Path(args.text_encoders) if args.text_encoders else weights.parent
    needed = family.TEXT_FOLDERS
    missing = [f"{name}/" for name in needed if not (encoders / name).is_dir()]
    if missing:
        raise CheckpointError(f"{encoders} lacks the text-encoder subfolder(s) {', '.join(missing)}: pass --text-encoders, a folder "
                              f"holding {', '.join(n + '/' for n in needed)} (e.g. the model's diffusers snapshot)")
    return weights, vae, encoders


def check_memory(args: argparse.Namespace, family: ModuleType, device: torch.device, dtype: torch.dtype,
                 size: tuple[int, int], offload: str, rows: int) -> tuple[Footprint, str]:
    """The run's Footprint, from the checkpoints' headers, with `rows` CFG rows per transformer call, and its offload mode
    (`offload`, or for "auto" the first that fits); ValueError with advice when `device` is clearly short of memory."""
    from zflux.common.memory import Footprint, checkpoint_numel, free_bytes, gib, largest_block_numel, streamed_numel
    from zflux.common.tiling import TILE

    weights, vae, encoders = components(args, family)
    transformer, vae = (weights / "transformer", weights / "vae") if vae is None else (weights, vae)
    text = [(encoders or weights) / name for name in family.TEXT_FOLDERS]

    def there(path: Path) -> bool:  # what is not there, or not safetensors, the loader names
        return path.is_file() or any(path.glob("*.safetensors*"))

    height, width = size
    footprint = Footprint(transformer_params=checkpoint_numel(transformer) if there(transformer) else 0,
                          block_params=largest_block_numel(transformer) if there(transformer) else 0,
                          vae_params=checkpoint_numel(vae) if there(vae) else 0,
                          text_params=sum(checkpoint_numel(p) for p in text if there(p)),
                          text_streamed_params=streamed_numel([p for p in text if there(p)]), pixels=height * width, rows=rows)
    free = free_bytes(device)
    tile = (8 * TILE) ** 2  # the decode goes in tiles by itself when it would not fit whole
    precision = args.precision or args.dtype  # fp8: the transformer's weights at one byte, the rest at --dtype
    if offload == "auto":
        chosen = footprint.choose_offload(precision, room=free, tile_pixels=tile) if free is not None and device.type == "cuda" else "none"
        if chosen is None:
            need = footprint.bytes(precision, "blocks", tile_pixels=tile)
            raise ValueError(f"{device} has {gib(free)} free; {args.model} in {precision} at {width}x{height} needs at least "
                             f"{gib(need)} even with --offload blocks and --vae-tiling; try a smaller --height / --width, a device "
                             "with more memory, or --device cpu")
        return footprint, chosen
    need = footprint.bytes(precision, offload, tile_pixels=tile)
    if free is not None and need > free:
        raise ValueError(f"{device} has {gib(free)} free; {args.model} in {precision} at {width}x{height} needs at least "
                         f"{gib(need)}{memory_advice(args, footprint, need=need, room=free, offload=offload)}")
    return footprint, offload


def memory_advice(args: argparse.Namespace, footprint: Footprint, need: int, room: int, offload: str) -> str:
    """The flags that would bring a run needing `need` bytes (with --offload `offload`, as the flags stand) within `room`:
    the estimate's ratio between the two runs, applied to `need`."""
    from zflux.common.memory import gib
    from zflux.common.offload import MODES
    from zflux.common.tiling import TILE

    tiles = None if args.vae_tiling is None else (8 * TILE) ** 2
    precision = args.precision or args.dtype
    smaller = "bf16" if precision == "fp32" else precision
    options = [(f"--offload {mode}", precision, mode, tiles) for mode in MODES[1:] if mode != offload]
    options += [("--vae-tiling", precision, offload, (8 * TILE) ** 2)] if tiles is None else []
    options += [("--dtype bf16", "bf16", offload, tiles)] if precision == "fp32" else []
    options += [("--precision fp8", "fp8", offload, tiles)] if args.precision is None else []
    options += [(f"--offload blocks --vae-tiling{' --dtype bf16' * (precision == 'fp32')}", smaller, "blocks", (8 * TILE) ** 2)]
    current = footprint.bytes(precision, offload, tile_pixels=tiles)
    fits = [f"{flags} (about {gib(scaled)})" for flags, dtype, mode, tile in options
            if (scaled := need * footprint.bytes(dtype, mode, tile_pixels=tile) // current) <= room]
    if fits:
        return "; this would fit: " + ", or ".join(fits[:3])
    return "; try a smaller --height / --width, a device with more memory, or --device cpu"


@contextmanager
def memory_reported(args: argparse.Namespace, request: Request) -> Iterator[None]:
    """Turn CUDA running out of memory into one MemoryError line: what the run needed at least, and the flags that would fit."""
    import torch

    from zflux.common.memory import gib, out_of_memory_need

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        need, total = out_of_memory_need(e, request.device)
        advice = memory_advice(args, request.footprint, need=need, room=total, offload=request.offload)
        raise MemoryError(f"out of memory on {request.device} ({gib(total)}): the run needed more than {gib(need)}{advice}") from None


def load_pipeline(args: argparse.Namespace, family: ModuleType, request: Request):
    """The pipeline for --model from --weights (snapshot folder, or transformer file + --vae + --text-encoders), built by `family`."""
    weights, vae, encoders = components(args, family)
    options = dict(variant=args.model, device=request.device, dtype=request.dtype, offload=request.offload,
                   precision=args.precision, **family.load_options(args))
    if vae is None:
        pipe = family.load_pipeline(weights, **options)
    else:
        pipe = family.load_pipeline(weights, vae=vae, text_encoders=encoders, **options)
    if args.backend:
        pipe.transformer.backend = args.backend
    pipe.cuda_graphs = args.cuda_graphs == "on"
    for path, _ in request.loras:  # every file against the model's modules and shapes before the first is applied
        pipe.loras.check(path)
    for path, scale in request.loras:
        pipe.load_lora(path, scale=scale)
    return pipe


def parameters_text(args: argparse.Namespace, family: ModuleType, request: Request, job: Job, size: tuple[int, int]) -> str:
    """A run's settings as image tools write them into a PNG ("parameters"): prompt, negative prompt, then "Key: value, ..."."""
    fields = {"Steps": request.settings.steps, "Sampler": "Euler", "Guidance": request.settings.guidance, "Seed": job.seed,
              "Size": f"{size[0]}x{size[1]}", "Model": args.model}
    if args.strength is not None:
        fields["Denoising strength"] = args.strength
    if request.loras:
        fields["Lora"] = " ".join(f"{path.name}:{scale}" for path, scale in request.loras)
    given = {dest: getattr(args, dest) for dest, default in family_flags(family).items() if getattr(args, dest) != default}
    fields |= {dest.replace("_", " ").capitalize(): value for dest, value in given.items()}  # as the user gave them
    fields["Version"] = f"zflux {__version__}"
    negative = [f"Negative prompt: {args.negative_prompt}"] if args.negative_prompt else []
    return "\n".join([job.prompt, *negative, ", ".join(f"{key}: {value}" for key, value in fields.items())])


def describe(args: argparse.Namespace) -> None:
    """zflux info: an image's generation settings, a snapshot folder component by component, or one checkpoint."""
    path = Path(args.path)
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".json", *PICKLE_SUFFIXES):
        describe_image(path)
    elif (path / "model_index.json").is_file():
        describe_snapshot(path)
    elif path.suffix == ".safetensors" and is_lora(path):
        print(path)
        print("\n".join("  " + line for line in read_lora(path).describe()))
    else:
        print(path)
        print("\n".join("  " + line for line in identify(path).lines()))


def describe_image(path: Path) -> None:
    from PIL import Image

    from zflux.common.images import PARAMETERS

    with Image.open(path) as image:
        print(f"{path}: {image.format} image, {image.width}x{image.height}")
        settings = image.info.get(PARAMETERS)
    print("\n".join("  " + line for line in settings.splitlines()) if settings else "  no generation settings stored")


def describe_snapshot(path: Path) -> None:
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
    from zflux.common.pipeline import read_scheduler

    scheduler = read_scheduler(folder)
    if scheduler.use_dynamic_shifting:
        line = f"shift growing with the image size (mu from {scheduler.base_shift} to {scheduler.max_shift})"
    else:
        line = f"static shift {scheduler.shift}"
    shipped = [name for name, variant in variants().items()
               if variant.scheduler == scheduler and (family is None or family in family_of(name).LAYOUTS)]
    return line + (f": {' or '.join(shipped)}'s schedule" if shipped else "")


def convert(args: argparse.Namespace) -> None:
    """zflux convert: detect the family from the keys, rewrite the keys, save one .safetensors file."""
    from zflux.common.weights import header_state_dict, read_state_dict, save_state_dict

    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output {dst} must be a .safetensors file")
    check_writable(dst)
    info = identify(args.src)
    if info.family not in layouts():
        names = ", ".join(family.NAME for family in families())
        raise CheckpointError(f"{args.src} holds {info.description}; zflux convert handles {names} and their autoencoder")
    layout = layouts()[info.family]
    try:
        layout.from_diffusers(header_state_dict(args.src))  # a missing part of a fused tensor fails here, before any tensor is read
    except CheckpointError as e:
        raise CheckpointError(f"{args.src}: {e}") from e
    original = layout.from_diffusers(read_state_dict(args.src))  # accepts every layout
    converted = layout.to_diffusers(original) if args.to == "diffusers" else original
    save_state_dict(converted, dst)
    print(f"{dst}: {len(converted)} tensors of {info.description}, {args.to} layout (read as {info.layout})")


def train_model(args: argparse.Namespace) -> None:
    """zflux train: one chunk of a run (it resumes from <out>/<what>/), then where its results are."""
    import torch

    from zflux.common.memory import check_device

    device = check_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 work outside autocast
        torch.backends.cudnn.benchmark = True  # the autoencoder's convolutions, at one fixed size
    run, defaults = trainable()[args.what]
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
