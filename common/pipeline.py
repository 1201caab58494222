"""What every pipeline shares: finding components on disk, checking a request, encoding prompts (the text encoder
offloaded between calls), where the Euler loop starts, the loop itself, and decoding.

A pipeline's generate() is a short list of steps, each one call:

    check the request    check_request()             the size, from the arguments or the init image
    schedule             scheduler.schedule()        the sigmas
    start latents        start_noise()               text to image: seeded noise (or given latents) at step 0
                         prepare_img2img()           image to image: the init image's latent, noised
                         prepare_inpaint()           inpainting: image to image's start, and the per-step blend
    encode the prompt    encode_prompts()
    build predict        the family's closure        predict(latents, i) -> the velocity at sigmas[i]: the
                                                     model call, CFG, the family's time rule and sign
    denoise              denoise()                   the Euler loop, with the progress bar
    decode               decode_latents()

How a new task plugs in, with no change to the loop: a `prepare_*()` (here when several families can
run it, else in the family's pipeline.py) returns the latents and step the loop starts from, and
whatever the task adds to the model's inputs (inpainting: a mask and the init image's latents;
control: control-image tokens or channels; editing: reference tokens and their positions); the
family's predict closure carries those inputs into the model call; a task that must rewrite part of
the latents after every step (inpainting keeps the unmasked region at the init image, noised to the
next sigma) hands denoise a `blend(latents, i)`.

Every family here decodes with the same 16-channel autoencoder. The transformer works on scaled
latents, `(z - shift_factor) * scaling_factor` of the autoencoder's raw latent z, so that they have
roughly unit variance like the noise they start from.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from zflux.common.images import check_mask, fit_image, mask_latents, mask_tensor, open_image, to_pil, to_tensor
from zflux.common.memory import default_device, vae_fits  # noqa: F401 (default_device: its old home)
from zflux.common.offload import Offload
from zflux.common.sampling import SamplingDefaults, SchedulerConfig, euler_step, img2img_latent, initial_noise, inpaint_blend
from zflux.common.tiling import tiled_decode, tiled_encode
from zflux.common.vae import Autoencoder
from zflux.common.weights import CheckpointError

DEFAULT_SIZE = 1024  # pixels, both sides, when neither a size nor an init image is given
Predict = Callable[[Tensor, int], Tensor]  # (latents, i) -> the velocity at sigmas[i]
Blend = Callable[[Tensor, int], Tensor]  # (latents, i) -> the latents after step i, as a task rewrites them


class DivergedError(FloatingPointError):
    """The latents became NaN or infinite while denoising (an fp16 overflow, a guidance scale far too high)."""


@dataclass(frozen=True)
class Variant:
    """One named checkpoint variant, whole in one entry of its family's VARIANTS table."""

    model: object  # the family's transformer config: an entry of its model.py PRESETS
    scheduler: SchedulerConfig  # the scheduler_config.json the checkpoint ships with
    defaults: SamplingDefaults  # what it is meant to run with


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


def check_request(prompt: str, height: int | None, width: int | None, multiple: int,
                  init_image: Image.Image | str | Path | None = None, latents: Tensor | None = None,
                  output_type: str = "pil") -> tuple[int, int, Image.Image | None]:
    """Validate a request before any work; return (height, width, init image opened if given as a path).

    The size defaults to the init image's, rounded down to a multiple of `multiple`, else to DEFAULT_SIZE.
    """
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
    if init_image is not None:
        init_image = open_image(init_image)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    if init_image is not None and latents is not None:
        raise ValueError("pass latents (initial noise) or init_image, not both")
    if init_image is not None:
        height = init_image.height // multiple * multiple if height is None else height
        width = init_image.width // multiple * multiple if width is None else width
    height = DEFAULT_SIZE if height is None else height
    width = DEFAULT_SIZE if width is None else width
    for name, size in (("height", height), ("width", width)):
        if size <= 0:
            raise ValueError(f"{name} {size} must be positive: a multiple of {multiple}, e.g. {DEFAULT_SIZE}")
        if size % multiple:
            raise ValueError(f"{name} {size} is not a multiple of {multiple} (the autoencoder's 8x times the 2x2 patches)")
    return height, width, init_image


def encode_prompts(encoder, prompt: str, negative_prompt: str | None, *, cfg: bool, max_length: int,
                   offload: Offload) -> tuple[Tensor, ...]:
    """The prompt encoder's outputs for [prompt], or with CFG for [prompt, negative prompt (default empty)].

    The encoder runs in `offload`'s encode stage (an offloaded one visits the device for this call
    only); the same prompts again reuse the last encoding.
    """
    prompts = [prompt, negative_prompt or ""] if cfg else [prompt]
    return offload.encode(encoder, prompts, max_length)


def start_noise(vae: Autoencoder, *, height: int, width: int, seed: int | torch.Generator, latents: Tensor | None,
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """Text to image's start latents (1, C, h, w) for a height x width image: `latents` if given, else noise seeded `seed`
    (or the next draw of a CPU generator, when a task draws from it first)."""
    down = vae.cfg.downscale
    shape = (1, vae.cfg.latent_channels, height // down, width // down)
    if latents is None:
        return initial_noise(shape, seed, device=device, dtype=dtype)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this size, got {tuple(latents.shape)}")
    return latents.to(device, dtype)


def encode_sample(vae: Autoencoder, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Pixels (1, 3, H, W) in [-1, 1] -> a posterior sample of their scaled latent (1, C, H/8, W/8) in the autoencoder's dtype.

    The sample is mean + std * noise, the noise drawn in the autoencoder's dtype from the CPU
    `generator`, then shifted and scaled in that dtype, as diffusers' image-conditioned pipelines
    sample (retrieve_latents(vae.encode(image), generator)): a bf16 autoencoder rounds where theirs does.
    """
    down = vae.cfg.downscale
    shape = (1, vae.cfg.latent_channels, pixels.shape[2] // down, pixels.shape[3] // down)
    raw = encode_raw(vae, pixels, initial_noise(shape, generator, device=pixels.device, dtype=vae.dtype))  # (1, C, H/8, W/8)
    return (raw - vae.cfg.shift_factor) * vae.cfg.scaling_factor


def encode_mode(vae: Autoencoder, pixels: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> the mode of their scaled latents (B, C, H/8, W/8) in the autoencoder's dtype.

    As diffusers' control and editing pipelines take a conditioning image's latent: latent_dist.mode(),
    then shifted and scaled in the autoencoder's dtype (no noise drawn).
    """
    return (encode_raw(vae, pixels) - vae.cfg.shift_factor) * vae.cfg.scaling_factor


def encode_raw(vae: Autoencoder, pixels: Tensor, noise: Tensor | None = None) -> Tensor:
    """vae.encode(pixels, noise) -> the raw latent (B, C, H/8, W/8): in tiles (common/tiling.py) when the run asks for them
    (vae.tiling True, a pipeline's vae_tiling=), or leaves it to auto (None) and the whole encode would not fit in the
    device's free memory."""
    tiling = vae.tiling
    if tiling is None:
        tiling = not vae_fits("encode", pixels.shape[2] * pixels.shape[3], dtype=vae.dtype, device=pixels.device)
    return tiled_encode(vae, pixels, noise) if tiling else vae.encode(pixels, noise)


def image_pixels(image: Image.Image, height: int, width: int, device: torch.device) -> Tensor:
    """An image resized to height x width (Lanczos, as diffusers' image processor) -> (1, 3, H, W) fp32 in [-1, 1] on `device`."""
    return to_tensor(fit_image(image, width, height)).to(device)


class InitLatents(NamedTuple):
    """Where a run that starts from an init image begins, and what that start is made of."""

    latents: Tensor  # (1, C, h, w): `known` noised with `noise` to sigmas[start]
    start: int  # index in sigmas of the first step: the last `strength` fraction of the steps remain
    known: Tensor  # (1, C, h, w): a posterior sample of the init image's scaled latent
    noise: Tensor  # (1, C, h, w): the run's noise


def noised_init(vae: Autoencoder, pixels: Tensor, sigmas: Tensor, *, strength: float, generator: torch.Generator,
                dtype: torch.dtype) -> InitLatents:
    """The init image's pixels (1, 3, H, W) -> the latents a run starts from at the step `strength` leaves.

    Draws twice from the CPU `generator`: the posterior sample's noise, then the noise it is mixed
    with; diffusers' img2img, inpainting and Fill pipelines draw the same two in the same order.
    """
    known = encode_sample(vae, pixels, generator).to(dtype)  # (1, C, h, w)
    latents, noise, start = img2img_latent(known, sigmas, strength=strength, seed=generator)
    return InitLatents(latents, start, known, noise)


def prepare_img2img(vae: Autoencoder, image: Image.Image, sigmas: Tensor, *, height: int, width: int, strength: float, seed: int,
                    device: torch.device, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Image to image's start: the init image's latent (1, C, h, w) noised to the step `strength` leaves, and that step's index.

    Both draws (noised_init) come from one CPU generator seeded `seed`.
    """
    init = noised_init(vae, image_pixels(image, height, width, device), sigmas, strength=strength,
                       generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
    return init.latents, init.start


def prepare_inpaint(vae: Autoencoder, image: Image.Image, mask: Image.Image, sigmas: Tensor, *, height: int, width: int,
                    strength: float, seed: int, device: torch.device, dtype: torch.dtype,
                    layout: Callable[[Tensor], Tensor] = lambda x: x) -> tuple[Tensor, int, Blend]:
    """Inpainting with a base model: the start latents (1, C, h, w), the first step's index and the per-step blend.

    The start is image to image's (same draws from one CPU generator seeded `seed`). After every
    step, blend(latents, i) puts back the known region (mask 0): the init image's latent re-noised to
    sigmas[i + 1] with the run's own noise (inpaint_blend); the mask, white (1) = repaint, is
    binarized at 0.5 and taken to the latent grid as diffusers' FLUX.1 and Z-Image inpainting
    pipelines take it. `layout` maps a (1, C, h, w) latent to the layout the loop runs in (FLUX.1:
    its packed tokens), so that the blend works on the loop's latents directly.
    """
    check_mask(mask, image)
    init = noised_init(vae, image_pixels(image, height, width, device), sigmas, strength=strength,
                       generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
    grid = mask_latents(mask_tensor(mask, width, height), *init.known.shape[2:]).to(device, dtype)  # (1, 1, h, w)
    known, noise, repaint = layout(init.known), layout(init.noise), layout(grid.expand_as(init.known))
    sigmas = sigmas.to(device)  # indexed on the latents' device: no host sync per step

    def blend(latents: Tensor, i: int) -> Tensor:
        return inpaint_blend(latents, known, noise, repaint, sigmas[i + 1])

    return init.latents, init.start, blend


def image_seq_len(vae: Autoencoder, height: int, width: int) -> int:
    """How many 2x2 patches of its latent a height x width image makes: the image tokens the schedule may depend on."""
    return (height // vae.cfg.downscale // 2) * (width // vae.cfg.downscale // 2)


def denoise(predict: Predict, latents: Tensor, sigmas: Tensor, start: int, *, blend: Blend | None = None,
            progress: bool = True, desc: str = "denoise") -> Tensor:
    """Euler steps from sigmas[start] down to sigmas[-1]: latents + (sigmas[i + 1] - sigmas[i]) * predict(latents, i).

    `predict(latents, i)` is the velocity (noise - image) at sigmas[i]; `blend(latents, i)`, for a task
    that has one, rewrites the latents after step i (they are then at sigmas[i + 1]). tqdm shows one
    bar tick per step, labelled `desc`.

    Latents that turn NaN or infinite raise DivergedError naming the first such step. The loop adds no
    host sync: each step's finiteness is a flag left on the device, and the flags are read once, after
    the last step (where decoding would wait for the device anyway). A run that diverges early still
    runs to the end before it stops: a few wasted steps, against a sync per step on every healthy run.
    """
    finite = []  # per step: a 0-dim bool on the latents' device
    for i in tqdm(range(start, len(sigmas) - 1), desc=desc, unit="step", disable=not progress):
        velocity = predict(latents, i)
        latents = euler_step(latents, velocity, sigma=sigmas[i], sigma_next=sigmas[i + 1])
        if blend is not None:
            latents = blend(latents, i)
        finite.append(torch.isfinite(latents).all())
    flags = torch.stack(finite).tolist() if finite else []  # the one host sync
    if not all(flags):
        step = start + flags.index(False) + 1
        raise DivergedError(f"the latents became NaN or infinite at step {step} of {len(sigmas) - 1}: try a more precise dtype "
                            "(bf16 or fp32 instead of fp16) or a lower guidance")
    return latents


def decode_raw(vae: Autoencoder, raw: Tensor, tiling: bool | None = None) -> list[Image.Image]:
    """Raw latents (B, C, h, w) -> B images, decoded in the autoencoder's dtype: in tiles (common/tiling.py) when
    `tiling` is True, or None (auto) and the whole decode would not fit in the device's free memory."""
    if tiling is None:
        tiling = not vae_fits("decode", raw.shape[2] * raw.shape[3] * vae.cfg.downscale**2, dtype=vae.dtype, device=raw.device)
    return to_pil(tiled_decode(vae, raw) if tiling else vae.decode(raw))


def decode_latents(vae: Autoencoder, latents: Tensor, tiling: bool | None = None) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) -> B images, decoded in the autoencoder's dtype (`tiling`: see decode_raw)."""
    raw = latents.float() / vae.cfg.scaling_factor + vae.cfg.shift_factor  # (B, C, h, w)
    return decode_raw(vae, raw, tiling)
