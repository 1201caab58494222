"""FLUX.1's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, EMBEDDED, TRAIN, TEXT_FOLDERS,
add_arguments, check_args, parallel_limits, load_options, load_pipeline and generate_options.
"""

import argparse
from pathlib import Path

from zflux.common.images import check_mask, load_image
from zflux.common.sampling import SamplingDefaults
from zflux.flux import convert
from zflux.flux.pipeline import EMBEDDED_MODEL, EMBEDDED_SIZE, VARIANTS, FluxPipeline, check_settings, check_task  # noqa: F401
from zflux.flux.training import SETTINGS, train_flux

NAME = "FLUX.1"
LAYOUTS = {"flux.1": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
EMBEDDED = {"flux-dev": (EMBEDDED_MODEL, EMBEDDED_SIZE)}  # variant -> (the small model zflux ships, its size in pixels)
TRAIN = {"flux-dev": (train_flux, SETTINGS)}  # what `zflux train` can train: (the run, its default settings)
TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # CLIP's, then T5's


def outpaint_borders(text: str) -> tuple[int, int, int, int]:
    """--outpaint LEFT,TOP,RIGHT,BOTTOM -> four non-negative pixel counts."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected LEFT,TOP,RIGHT,BOTTOM (four non-negative pixel counts), got {text!r}")
    return tuple(int(p) for p in parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX.1's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    group = parser.add_argument_group(NAME, "--guidance is the embedded guidance (dev 3.5, fill and canny 30, depth 10, kontext "
                                            "3.5, redux 2.5; schnell has none); --negative-prompt needs --true-cfg > 1; --mask "
                                            "inpaints with flux-dev, flux-schnell and flux-fill; --control-image is flux-canny's "
                                            "and flux-depth's (depth maps as given); --reference-image is the image flux-kontext "
                                            "edits, or what flux-redux conditions on; --strength defaults to 0.6 for "
                                            "image-to-image and inpainting, 1.0 for flux-fill")
    group.add_argument("--true-cfg", type=float, default=1.0, help="real CFG scale against the negative prompt (> 1 turns it on)")
    group.add_argument("--outpaint", type=outpaint_borders, metavar="LEFT,TOP,RIGHT,BOTTOM",
                       help="flux-fill: grow --init-image by these pixels on each side and fill the new border")
    group.add_argument("--redux", metavar="FOLDER", help="flux-redux: the FLUX.1-Redux-dev snapshot, or its flux1-redux-dev.safetensors "
                                                         "(then with --siglip)")
    group.add_argument("--siglip", metavar="FOLDER", help="flux-redux: the SigLIP model (google/siglip-so400m-patch14-384); "
                                                          "default: the --redux snapshot's image_encoder/")


def check_args(args: argparse.Namespace, height: int, width: int) -> SamplingDefaults:
    """FLUX.1's checks of a height x width request, before anything loads (zflux.cli's docstring): the sampling settings it
    will run with. The task's inputs are checked against --model by check_task (no image read: generate_options reads
    them). Its positions are computed, not tabled: any size that fits in memory."""
    if args.true_cfg < 1:
        raise ValueError(f"--true-cfg {args.true_cfg}: the true CFG scale is >= 1 (1: off)")
    if (args.redux is not None) != (args.model == "flux-redux"):
        raise ValueError("--model flux-redux needs --redux FOLDER (FLUX.1-Redux-dev)" if args.redux is None else
                         f"--redux goes with --model flux-redux, not {args.model}")
    if args.siglip is not None and args.redux is None:
        raise ValueError("--siglip goes with --redux")
    task = check_task(args.model, init_image=args.init_image is not None, mask=args.mask is not None,
                      control_image=args.control_image is not None, control_preprocess=args.control_preprocess,
                      reference_images=len(args.reference_image or []), outpaint=args.outpaint is not None,
                      redux=args.redux is not None)
    if args.true_cfg > 1 and args.reference_image and task != "kontext":
        raise ValueError(f"--true-cfg {args.true_cfg}: FLUX.1 Redux (--reference-image) runs without true CFG; leave --true-cfg at 1")
    return check_settings(args.model, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, steps=args.steps,
                          guidance=args.guidance)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of FluxPipeline.generate that FLUX.1's flags set, their images read (and the mask checked
    against the init image) before any weight loads; check_args has checked the task."""
    control_image = load_image(args.control_image) if args.control_image else None
    references = [load_image(path) for path in args.reference_image or []]
    mask = load_image(args.mask) if args.mask else None
    if mask is not None:
        check_mask(mask, load_image(args.init_image))
    return dict(true_cfg=args.true_cfg, mask=mask, control_image=control_image, control_preprocess=args.control_preprocess,
                reference_images=references or None, outpaint=args.outpaint)


def cfg_rows(args: argparse.Namespace, settings: SamplingDefaults) -> int:
    """The rows each transformer call carries: 2 with true CFG (--true-cfg > 1), else 1."""
    return 2 if args.true_cfg > 1 else 1


def parallel_limits(args: argparse.Namespace, settings: SamplingDefaults) -> tuple[bool, int]:
    """For --parallel: whether the run's model calls carry CFG rows (true CFG), and the heads attention splits over shards."""
    return cfg_rows(args, settings) > 1, VARIANTS[args.model].model.num_attention_heads


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_pipeline that FLUX.1's flags set: Redux's folders."""
    return dict(redux=args.redux, siglip=args.siglip)


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, redux: str | None = None,
                  siglip: str | None = None, **options) -> FluxPipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder;
    with `redux`, FLUX.1 Redux loaded onto it."""
    if vae is None:
        pipe = FluxPipeline.from_pretrained(weights, **options)
    else:
        pipe = FluxPipeline.from_single_files(weights, vae, t5=text_encoders / "text_encoder_2", t5_tokenizer=text_encoders / "tokenizer_2",
                                              clip=text_encoders / "text_encoder", clip_tokenizer=text_encoders / "tokenizer", **options)
    if redux is not None:
        pipe.load_redux(redux, siglip)
    return pipe
