"""Z-Image's part of the `zflux` command: its flags, its generate() options and how its pipeline loads.

zflux.cli reads these names from every family it lists: NAME, VARIANTS, LAYOUTS, EMBEDDED, TRAIN, TEXT_FOLDERS,
add_arguments, check_args, parallel_limits, load_options, load_pipeline and generate_options.

    zflux generate --model z-image-turbo --weights Z-Image-Turbo --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors \
        --control-image pose.png --control-scale 0.75 --prompt "a dancer" --out dancer.png
    zflux generate --model z-image-omni --weights Z-Image-Omni --reference-image cat.png --prompt "the cat, in a hat" --out hat.png
"""

import argparse
from pathlib import Path

from zflux.common.identify import check_family
from zflux.common.images import check_mask, load_image
from zflux.common.vae import PRESETS as AUTOENCODERS
from zflux.zimg import convert
from zflux.zimg.pipeline import EMBEDDED_MODEL, EMBEDDED_SIZE, OMNI, VARIANTS, ZImageDefaults, ZImagePipeline, check_settings
from zflux.zimg.training import SETTINGS, train_zimage

NAME = "Z-Image"
LAYOUTS = {"z-image": convert}  # identify()'s family name -> the module with its key maps, for zflux convert
EMBEDDED = {"z-image-turbo": (EMBEDDED_MODEL, EMBEDDED_SIZE)}  # variant -> (the small model zflux ships, its size in pixels)
TRAIN = {"z-image-turbo": (train_zimage, SETTINGS)}  # what `zflux train` can train: (the run, its default settings)
TEXT_FOLDERS = ("text_encoder", "tokenizer")  # what --text-encoders holds for a transformer file
SIGLIP_FOLDERS = ("siglip", "siglip_processor")  # what it also holds for a z-image-omni transformer file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Z-Image's own flags of `zflux generate`, in a group that also says what the shared ones mean for it."""
    group = parser.add_argument_group(NAME, "--guidance is the CFG scale (turbo 0, base 4, omni 5); --negative-prompt needs "
                                            "--guidance > 0; --init-image with --mask inpaints (with --control-image too: "
                                            "ControlNet inpainting); --control-image needs --controlnet; --reference-image is "
                                            "z-image-omni's; --strength defaults to 0.6 for image-to-image, 1.0 for inpainting")
    group.add_argument("--cfg-normalization", type=float, help="cap the guided prediction's norm at this multiple of the conditional one's")
    group.add_argument("--cfg-truncation", type=float, help="no CFG once the model time 1 - sigma exceeds this")
    group.add_argument("--controlnet", help="a ControlNet Union file (Z-Image-Turbo-Fun-Controlnet-Union*.safetensors) or folder")
    group.add_argument("--control-scale", type=float, default=0.75, help="how strongly the control image steers (default 0.75)")


def check_args(args: argparse.Namespace, height: int, width: int) -> ZImageDefaults:
    """Z-Image's checks of a height x width request, before anything loads (zflux.cli's docstring): the sampling settings
    it will run with. Each side must fit the model's RoPE position table."""
    cfg = VARIANTS[args.model].model
    pixels_per_position = cfg.patch_size * AUTOENCODERS["flux"].downscale
    for name, size, positions in (("height", height, cfg.axes_lens[1]), ("width", width, cfg.axes_lens[2])):
        if size > positions * pixels_per_position:
            raise ValueError(f"{name} {size} is past {NAME}'s position table: at most {positions * pixels_per_position} pixels")
    return check_settings(args.model, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                          cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)


def cfg_rows(args: argparse.Namespace, settings: ZImageDefaults) -> int:
    """The rows each transformer call carries: 2 with CFG (guidance > 0: the prompt's and the negative prompt's), else 1."""
    return 2 if settings.guidance > 0 else 1


def parallel_limits(args: argparse.Namespace, settings: ZImageDefaults) -> tuple[bool, int]:
    """For --parallel: whether the run's model calls carry CFG rows, and the heads attention splits over sequence shards."""
    if "sp" in args.parallel and args.model == OMNI:
        raise ValueError(f"--parallel {args.parallel}: z-image-omni's token groups are not sharded; use cfg or dp")
    return cfg_rows(args, settings) > 1, VARIANTS[args.model].model.n_heads


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of load_pipeline that only Z-Image's flags set."""
    return dict(controlnet=Path(args.controlnet) if args.controlnet else None)


def load_pipeline(weights: Path, vae: Path | None = None, text_encoders: Path | None = None, controlnet: Path | None = None,
                  **options) -> ZImagePipeline:
    """The pipeline from a snapshot folder, or from a transformer file with its autoencoder file and text-encoder folder
    (which, for z-image-omni, also holds siglip/ and siglip_processor/); then the --controlnet file if given."""
    if vae is None:
        pipe = ZImagePipeline.from_pretrained(weights, **options)
    else:
        siglip = tuple(text_encoders / name for name in SIGLIP_FOLDERS) if options["variant"] == OMNI else None
        pipe = ZImagePipeline.from_single_files(weights, vae, text_encoders / "text_encoder", text_encoders / "tokenizer",
                                                siglip=siglip, **options)
    if controlnet is not None:
        pipe.load_controlnet(controlnet)
    return pipe


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ZImagePipeline.generate that only Z-Image's flags set, checked and their images read
    before anything loads (zflux.cli calls this first)."""
    omni = args.model == OMNI
    if args.reference_image and not omni:
        raise ValueError("--reference-image is z-image-omni's (editing): pass --model z-image-omni with an Omni snapshot")
    if omni and (args.control_image or args.controlnet or args.mask or args.init_image):
        raise ValueError("z-image-omni edits through --reference-image; --controlnet, --control-image, --mask and --init-image "
                         "are for z-image-turbo and z-image")
    if args.control_image and not args.controlnet and not (Path(args.weights) / "controlnet").is_dir():
        raise ValueError("--control-image needs --controlnet FILE (or --weights, a ZImageControlNetPipeline snapshot)")
    if args.controlnet:
        check_family(args.controlnet, "z-image-controlnet")
    if args.control_preprocess and not args.control_image:
        raise ValueError("--control-preprocess makes the control map from --control-image: pass the photo there")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs the --init-image it masks")
    image = lambda path: load_image(path) if path else None  # noqa: E731
    mask = image(args.mask)
    if mask is not None:
        check_mask(mask, load_image(args.init_image))
    return dict(cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation,
                control_image=image(args.control_image), control_scale=args.control_scale,
                control_preprocess=args.control_preprocess, mask=mask,
                reference_images=[load_image(path) for path in args.reference_image or []] or None)
