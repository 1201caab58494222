"""What the Z-Image and FLUX.1 pipelines share: finding components on disk, the start of every generate() call
(checking the request, encoding the prompts with text-encoder offload, the schedule and the starting latents),
and the path between PIL images and the transformer's (scaled) latents.

Both families decode with the same 16-channel autoencoder. The transformer works on scaled latents,
`(z - shift_factor) * scaling_factor` of the autoencoder's raw latent z, so that they have roughly
unit variance like the noise they start from.
"""

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from PIL import Image
from torch import Tensor

from zflux.common.images import fit_image, load_image, to_pil, to_tensor
from zflux.common.sampling import SamplingDefaults, SchedulerConfig, img2img_latent, initial_noise
from zflux.common.vae import Autoencoder
from zflux.common.weights import CheckpointError

DEFAULT_SIZE = 1024  # pixels, both sides, when neither a size nor an init image is given


@dataclass(frozen=True)
class Variant:
    """One named checkpoint variant, whole in one entry of its family's VARIANTS table."""

    model: object  # the family's transformer config: an entry of its model.py PRESETS
    scheduler: SchedulerConfig  # the scheduler_config.json the checkpoint ships with
    defaults: SamplingDefaults  # what it is meant to run with


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_snapshot(path: str | Path, pipelines: tuple[str, ...], subfolders: tuple[str, ...]) -> Path:
    """Check that `path` is a diffusers snapshot of one of `pipelines` with every subfolder; return it as a Path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: pass a diffusers snapshot folder (model_index.json + subfolders), "
                              "or load single files with from_single_files")
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{path} has no model_index.json: it is not a diffusers snapshot folder")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in pipelines:
        raise CheckpointError(f"{path} is a {class_name} snapshot, not {' or '.join(pipelines)}")
    missing = [f"{name}/" for name in subfolders if not (path / name).is_dir()]
    if missing:
        raise CheckpointError(f"{path} lacks the subfolder(s) {', '.join(missing)} that a {pipelines[0]} snapshot holds")
    return path


def read_scheduler(folder: str | Path) -> SchedulerConfig:
    """The sampler settings in a snapshot's `scheduler/scheduler_config.json`."""
    config = Path(folder) / "scheduler_config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no scheduler_config.json")
    try:
        return SchedulerConfig.from_diffusers(json.loads(config.read_text()))
    except ValueError as e:
        raise CheckpointError(f"{config}: {e}") from e


def as_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL image, opening it first when given a path."""
    return image if isinstance(image, Image.Image) else load_image(image)


def check_request(prompt: str, height: int | None, width: int | None, multiple: int,
                  init_image: Image.Image | None = None) -> tuple[int, int]:
    """Validate the prompt and size; return (height, width), taken from the init image (rounded down) when not given."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    if init_image is not None:
        height = height or init_image.height // multiple * multiple
        width = width or init_image.width // multiple * multiple
    height, width = height or DEFAULT_SIZE, width or DEFAULT_SIZE
    for name, size in (("height", height), ("width", width)):
        if size < multiple or size % multiple:
            raise ValueError(f"{name} {size} is not a multiple of {multiple} (the autoencoder's 8x times the 2x2 patches)")
    return height, width


def check_latents(latents: Tensor, shape: tuple[int, ...], init_image: Image.Image | None) -> None:
    """Reject given initial latents of the wrong shape, or given together with an init image."""
    if init_image is not None:
        raise ValueError("pass latents (initial noise) or init_image, not both")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this size, got {tuple(latents.shape)}")


@contextmanager
def text_encoder_on(encoder, device: torch.device, offload: bool) -> Iterator[None]:
    """Run the enclosed encoding with `encoder` on `device`; when offloaded it lives on the CPU otherwise."""
    if offload:
        encoder.to(device)
    try:
        yield
    finally:
        if offload:
            encoder.to("cpu")


def encode_image(vae: Autoencoder, image: Image.Image, height: int, width: int, device: torch.device,
                 generator: torch.Generator) -> Tensor:
    """An init image, resized to height x width -> a sample of its scaled latent (1, C, height/8, width/8) fp32.

    The latent is drawn from the autoencoder's posterior, mean + std * noise, with the noise drawn in
    the autoencoder's dtype from the CPU `generator`, as diffusers' img2img pipelines do
    (retrieve_latents(vae.encode(image), generator), sample_mode "sample").
    """
    down = vae.cfg.downscale
    pixels = to_tensor(fit_image(image, width, height)).to(device)  # (1, 3, H, W)
    noise = initial_noise((1, vae.cfg.latent_channels, height // down, width // down), generator, device, vae.dtype)
    raw = vae.encode(pixels, noise).float()  # (1, C, H/8, W/8)
    return (raw - vae.cfg.shift_factor) * vae.cfg.scaling_factor


def start_latents(vae: Autoencoder, shape: tuple[int, ...], sigmas: Tensor, seed: int, device: torch.device,
                  dtype: torch.dtype, latents: Tensor | None, init_image: Image.Image | None,
                  strength: float) -> tuple[Tensor, int]:
    """The latents (1, C, h, w) the Euler loop starts from, and its first step index.

    Given `latents` start at step 0; otherwise seeded noise starts at step 0, or, with an init image,
    a sample of the image's latent noised to the step `strength` leaves. Image to image draws twice
    from one CPU generator seeded `seed`: the posterior sample's noise, then the noise it is mixed
    with; diffusers' Z-Image and FLUX.1 img2img pipelines draw the same two in the same order.
    """
    if latents is not None:
        check_latents(latents, shape, init_image)
        return latents.to(device, dtype), 0
    if init_image is not None:
        down = vae.cfg.downscale
        generator = torch.Generator("cpu").manual_seed(seed)
        image_latents = encode_image(vae, init_image, shape[2] * down, shape[3] * down, device, generator).to(dtype)  # (1, C, h, w)
        return img2img_latent(image_latents, sigmas, strength, generator)
    return initial_noise(shape, seed, device, dtype), 0


class Start(NamedTuple):
    """What the Euler loop of a generate() call starts from."""

    text: tuple[Tensor, Tensor]  # the prompt encoder's outputs for [prompt], or [prompt, negative prompt] with CFG
    sigmas: Tensor  # (steps + 1,)
    latents: Tensor  # (1, C, h, w): the given latents, seeded noise, or the noised init image
    step: int  # index in sigmas of the first step


def begin(pipe, settings: SamplingDefaults, prompt: str, negative_prompt: str | None, use_cfg: bool, height: int | None,
          width: int | None, seed: int, latents: Tensor | None, init_image: Image.Image | str | Path | None, strength: float,
          output_type: str, dtype: torch.dtype) -> Start:
    """The part of generate() both pipelines share: check the request, then set up the loop (latents in `dtype`).

    `pipe` is a ZImagePipeline or FluxPipeline: its vae, scheduler, text_encoder (offloaded to the CPU
    between prompts if offload_text_encoder) and device are used. The size defaults to the init
    image's, rounded down to a multiple of 16, else to DEFAULT_SIZE.
    """
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
    init_image = None if init_image is None else as_image(init_image)
    down = pipe.vae.cfg.downscale
    height, width = check_request(prompt, height, width, 2 * down, init_image)
    shape = (1, pipe.vae.cfg.latent_channels, height // down, width // down)
    sigmas = pipe.scheduler.schedule(settings.steps, (shape[2] // 2) * (shape[3] // 2))  # (steps + 1,)
    latents, step = start_latents(pipe.vae, shape, sigmas, seed, pipe.device, dtype, latents, init_image, strength)
    prompts = [prompt, negative_prompt or ""] if use_cfg else [prompt]
    with text_encoder_on(pipe.text_encoder, pipe.device, pipe.offload_text_encoder):
        text = pipe.text_encoder(prompts, settings.max_sequence_length)
    return Start(text, sigmas, latents, step)


def finish(vae: Autoencoder, latents: Tensor, output_type: str) -> Image.Image | Tensor:
    """What generate() returns: the final latents (output_type "latent") or the decoded image ("pil")."""
    return latents if output_type == "latent" else decode_latents(vae, latents)[0]


def decode_latents(vae: Autoencoder, latents: Tensor) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) -> B images, decoded in the autoencoder's dtype."""
    raw = latents.float() / vae.cfg.scaling_factor + vae.cfg.shift_factor  # (B, C, h, w)
    return to_pil(vae.decode(raw))
