"""Z-Image's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, TEXT_FOLDERS,
add_arguments, check_args, load_pipeline and generate_options.
"""

import argparse
from pathlib import Path

from zflux.common.vae import PRESETS as AUTOENCODERS
from zflux.zimg import convert
from zflux.zimg.pipeline import VARIANTS, ZImageDefaults, ZImagePipeline, check_settings

NAME = "Z-Image"
LAYOUTS = {"z-image": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
TEXT_FOLDERS = ("text_encoder", "tokenizer")  # what --text-encoders holds for a transformer file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Z-Image's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    group = parser.add_argument_group(NAME, "--guidance is the CFG scale (turbo 0, base 4); --negative-prompt needs --guidance > 0")
    group.add_argument("--cfg-normalization", type=float, help="cap the guided prediction's norm at this multiple of the conditional one's")
    group.add_argument("--cfg-truncation", type=float, help="no CFG once the model time 1 - sigma exceeds this")


def check_args(args: argparse.Namespace) -> ZImageDefaults:
    """Z-Image's checks of a request, before anything loads (zflux.cli's docstring): the sampling settings it will run with.

    args.height and args.width are settled; each must fit the model's RoPE position table.
    """
    cfg = VARIANTS[args.model].model
    pixels_per_position = cfg.patch_size * AUTOENCODERS["flux"].downscale
    for name, size, positions in (("height", args.height, cfg.axes_lens[1]), ("width", args.width, cfg.axes_lens[2])):
        if size > positions * pixels_per_position:
            raise ValueError(f"{name} {size} is past {NAME}'s position table: at most {positions * pixels_per_position} pixels")
    return check_settings(args.model, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                          cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, **options) -> ZImagePipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder."""
    if vae is None:
        return ZImagePipeline.from_pretrained(weights, **options)
    return ZImagePipeline.from_single_files(weights, vae, text_encoders / "text_encoder", text_encoders / "tokenizer", **options)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ZImagePipeline.generate that only Z-Image's flags set."""
    return dict(cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)
