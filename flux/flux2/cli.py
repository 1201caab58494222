"""FLUX.2's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, EMBEDDED, TRAIN, TEXT_FOLDERS,
add_arguments, check_args, parallel_limits, load_options, load_pipeline and generate_options (called before any weight is
loaded, so the reference images and the mask are read and checked first). --reference-image and
--mask are shared flags (Z-Image uses them too).
"""

import argparse
from pathlib import Path

from zflux.common.images import load_image
from zflux.common.sampling import SamplingDefaults
from zflux.flux.flux2 import convert
from zflux.flux.flux2.pipeline import VARIANTS, Flux2Pipeline, check_inputs, check_settings  # noqa: F401 (VARIANTS: the --model choices)

NAME = "FLUX.2"
LAYOUTS = {"flux.2": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
EMBEDDED: dict = {}  # zflux ships no small FLUX.2 (zimg/ and flux/ hold the small models)
TRAIN: dict = {}  # nor trains one
TEXT_FOLDERS = ("text_encoder", "tokenizer")  # Mistral 3 ([dev]) or Qwen3 (klein), as in the models' repositories


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX.2's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    parser.add_argument_group(NAME, "--guidance is flux2-dev's embedded guidance (4.0) or klein base's CFG scale (4.0; distilled "
                                    "klein takes none); --reference-image (repeatable, any variant) edits or combines images, the "
                                    "size defaulting to the first one's; --init-image with --mask (white = repaint) inpaints with "
                                    "klein")


def check_args(args: argparse.Namespace, height: int, width: int) -> SamplingDefaults:
    """FLUX.2's checks of a height x width request, before anything loads (zflux.cli's docstring): the sampling settings it
    will run with. Its positions are computed, not tabled: any size that fits in memory."""
    if args.control_image or args.control_preprocess:
        raise ValueError(f"{'--control-image' if args.control_image else '--control-preprocess'} does not apply to {NAME} "
                         "(FLUX.1 Canny and Depth, and Z-Image with --controlnet, take it)")
    return check_settings(args.model, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance)


def cfg_rows(args: argparse.Namespace, settings: SamplingDefaults) -> int:
    """The rows each transformer call carries: 2 for klein base with guidance > 1 (true CFG), else 1."""
    return 2 if VARIANTS[args.model].cfg and settings.guidance > 1 else 1


def parallel_limits(args: argparse.Namespace, settings: SamplingDefaults) -> tuple[bool, int]:
    """For --parallel: whether the run's model calls carry CFG rows (klein base), and the heads attention splits over shards."""
    variant = VARIANTS[args.model]
    if "sp" in args.parallel and variant.kv and args.reference_image:
        raise ValueError(f"--parallel {args.parallel}: klein KV's cached reference keys are not sharded; use dp")
    return cfg_rows(args, settings) > 1, variant.model.num_attention_heads


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_pipeline that only FLUX.2's flags set: none."""
    return {}


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, **options) -> Flux2Pipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder."""
    if vae is None:
        return Flux2Pipeline.from_pretrained(weights, **options)
    return Flux2Pipeline.from_single_files(weights, vae, text_encoders / "text_encoder", text_encoders / "tokenizer", **options)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of Flux2Pipeline.generate that only FLUX.2's flags set, each image read and checked."""
    references = [load_image(path) for path in args.reference_image or []]
    mask = load_image(args.mask) if args.mask else None
    init = load_image(args.init_image) if args.init_image else None
    check_inputs(args.model, references, init, mask)
    if mask is not None and mask.size != init.size:
        raise ValueError(f"--mask {args.mask} is {mask.width}x{mask.height} but --init-image is {init.width}x{init.height}")
    return dict(reference_images=references or None, mask=mask)
