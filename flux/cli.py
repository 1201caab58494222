"""FLUX.1's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, EMBEDDED, TRAIN, TEXT_FOLDERS,
add_arguments, check_args, load_options, load_pipeline and generate_options.
"""

import argparse
from pathlib import Path

from zflux.common.sampling import SamplingDefaults
from zflux.flux import convert
from zflux.flux.pipeline import EMBEDDED_MODEL, EMBEDDED_SIZE, VARIANTS, FluxPipeline, check_settings
from zflux.flux.training import SETTINGS, train_flux

NAME = "FLUX.1"
LAYOUTS = {"flux.1": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
EMBEDDED = {"flux-dev": (EMBEDDED_MODEL, EMBEDDED_SIZE)}  # variant -> (the small model zflux ships, its size in pixels)
TRAIN = {"flux-dev": (train_flux, SETTINGS)}  # what `zflux train` can train: (the run, its default settings)
TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # CLIP's, then T5's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX.1's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    group = parser.add_argument_group(NAME, "--guidance is flux-dev's embedded guidance (3.5; schnell has none); "
                                            "--negative-prompt needs --true-cfg > 1")
    group.add_argument("--true-cfg", type=float, default=1.0, help="real CFG scale against the negative prompt (> 1 turns it on)")


def check_args(args: argparse.Namespace, height: int, width: int) -> SamplingDefaults:
    """FLUX.1's checks of a height x width request, before anything loads (zflux.cli's docstring): the sampling settings it
    will run with. Its positions are computed, not tabled: any size that fits in memory."""
    if args.true_cfg < 1:
        raise ValueError(f"--true-cfg {args.true_cfg}: the true CFG scale is >= 1 (1: off)")
    if args.mask or args.reference_image:
        raise ValueError(f"{'--mask' if args.mask else '--reference-image'} does not apply to {NAME} text and image to image "
                         "(FLUX.2 and Z-Image take it)")
    return check_settings(args.model, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, steps=args.steps,
                          guidance=args.guidance)


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_pipeline that only FLUX.1's flags set: none."""
    return {}


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, **options) -> FluxPipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder."""
    if vae is None:
        return FluxPipeline.from_pretrained(weights, **options)
    return FluxPipeline.from_single_files(weights, vae, t5=text_encoders / "text_encoder_2", t5_tokenizer=text_encoders / "tokenizer_2",
                                          clip=text_encoders / "text_encoder", clip_tokenizer=text_encoders / "tokenizer", **options)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of FluxPipeline.generate that only FLUX.1's flags set."""
    return dict(true_cfg=args.true_cfg)
