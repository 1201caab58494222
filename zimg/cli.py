"""Z-Image's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, TEXT_FOLDERS,
add_arguments, generate_options, load_options and load_pipeline.
"""

import argparse
from pathlib import Path

from zflux.zimg import convert
from zflux.zimg.pipeline import VARIANTS, ZImagePipeline  # noqa: F401 (VARIANTS: the --model choices)

NAME = "Z-Image"
LAYOUTS = {"z-image": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
TEXT_FOLDERS = ("text_encoder", "tokenizer")  # what --text-encoders holds for a transformer file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Z-Image's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    group = parser.add_argument_group(NAME, "--guidance is the CFG scale (turbo 0, base 4); --negative-prompt needs --guidance > 0; "
                                            "--init-image with --mask inpaints")
    group.add_argument("--cfg-normalization", type=float, help="cap the guided prediction's norm at this multiple of the conditional one's")
    group.add_argument("--cfg-truncation", type=float, help="no CFG once the model time 1 - sigma exceeds this")


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, **options) -> ZImagePipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder."""
    if vae is None:
        return ZImagePipeline.from_pretrained(weights, **options)
    return ZImagePipeline.from_single_files(weights, vae, text_encoders / "text_encoder", text_encoders / "tokenizer", **options)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ZImagePipeline.generate that only Z-Image's flags set; the shared flags no Z-Image model
    takes are refused here, before any weight loads."""
    given = [flag for flag, value in (("--control-image", args.control_image), ("--preprocess", args.preprocess),
                                      ("--reference-image", args.reference_image)) if value]
    if given:
        raise ValueError(f"{args.model} takes no {' or '.join(given)} (the FLUX.1 tools do)")
    return dict(cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_pipeline that Z-Image's flags set: none."""
    return {}
