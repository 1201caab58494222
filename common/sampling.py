"""Flow-matching sampling: sigma schedules, the Euler step, classifier-free guidance, seeded noise, img2img and the inpainting blend.

Every family here is a rectified flow. A latent at noise level sigma is

    x_sigma = sigma * noise + (1 - sigma) * image,      sigma from 1 (pure noise) down to 0,

and the sampler integrates dx/dsigma = velocity (noise - image) with plain Euler steps over a
decreasing list of sigmas (a model that predicts image - noise has its pipeline negate it). What
differs between checkpoints is only where the sigmas sit and how many there are:

- an even grid 1, 1 - 1/N, ..., 1/N (then 0), bent towards high noise by a *shift*: static (a
  number in the scheduler config), resolution-dependent (`mu` grows linearly with the number of
  image tokens), or none;
- how many steps the checkpoint was distilled for or tuned at (each family's VARIANTS table).

Every number here reproduces diffusers' FlowMatchEulerDiscreteScheduler as diffusers' pipelines
configure it, including its float32 rounding (see sigma_schedule for the one grid that may sit a
float32 step away), so that a pipeline built on these functions matches diffusers to floating-point
precision. The time each model receives for a sigma is its family's rule (its pipeline.py).
"""

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from zflux.common.weights import config_from_dict

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' timestep = sigma * 1000; the models were trained on that scale


@dataclass(frozen=True)
class SchedulerConfig:
    """How a checkpoint shifts its sigmas; field names as in diffusers' scheduler_config.json."""

    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self):
        if self.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be {NUM_TRAIN_TIMESTEPS} (every pipeline here assumes it), "
                             f"got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "SchedulerConfig":
        """Build from a FlowMatchEulerDiscreteScheduler scheduler_config.json dict; refuse options we do not implement."""
        unsupported = {
            "use_karras_sigmas": True, "use_exponential_sigmas": True, "use_beta_sigmas": True,
            "invert_sigmas": True, "stochastic_sampling": True,
        }
        used = [k for k, v in unsupported.items() if config.get(k) == v]
        if config.get("shift_terminal"):
            used.append("shift_terminal")
        if config.get("time_shift_type", "exponential") != "exponential":
            used.append(f"time_shift_type={config['time_shift_type']!r}")
        if used:
            raise ValueError(f"scheduler config uses options this sampler does not implement: {', '.join(used)}")
        return config_from_dict(cls, config)

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for `image_seq_len` image tokens: the line through (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift), extrapolated beyond them (diffusers' calculate_shift)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + (self.base_shift - slope * self.base_image_seq_len)

    def schedule(self, steps: int, image_seq_len: int) -> Tensor:
        """The (steps + 1,) sigmas for an image of `image_seq_len` 2x2 latent patches."""
        if self.use_dynamic_shifting:
            return sigma_schedule(steps, mu=self.mu(image_seq_len))
        return sigma_schedule(steps, shift=self.shift)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a checkpoint is meant to run with (model cards, diffusers' examples); a family may add fields."""

    steps: int  # model calls per image (per guidance branch)
    guidance: float  # the guidance scale: its family's pipeline says what the model does with it
    max_sequence_length: int  # text tokens

    def given(self, **settings) -> "SamplingDefaults":
        """These defaults with every setting in `settings` that is not None in its place."""
        return replace(self, **{k: v for k, v in settings.items() if v is not None})


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Static shift: s -> shift * s / (1 + (shift - 1) * s), which spends more steps at high noise when shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: Tensor) -> Tensor:
    """Exponential time shift: s -> e^mu / (e^mu + (1/s - 1)); equals shift_sigmas with shift = e^mu."""
    e = math.exp(mu)
    # torch.div, not `e / tensor`: Python's reflected division multiplies by a reciprocal, one rounding
    # more than diffusers' numpy division.
    return torch.div(e, e + (1 / sigmas - 1))


def sigma_schedule(steps: int, *, shift: float | None = None, mu: float | None = None) -> Tensor:
    """The (steps + 1,) fp32 sigmas from 1 down to a final 0, shifted statically (`shift`) or by `mu` (not both)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift is not None and mu is not None:
        raise ValueError("pass shift (a static shift) or mu (a resolution-dependent one), not both")
    # The even grid rounded once from float64, as diffusers' np.linspace grid; one built with float32
    # torch.linspace instead (as some of diffusers' pipelines do) can land one float32 step away.
    sigmas = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).float()  # (steps,)
    if mu is not None:
        sigmas = time_shift(mu, sigmas)
    elif shift is not None:
        sigmas = shift_sigmas(sigmas, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (steps + 1,)


def euler_step(x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step x + (sigma_next - sigma) * velocity, with diffusers' precision; returns x's dtype."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)  # 0-dim
    # A 0-dim dt leaves the product in the velocity's dtype (bf16 from a bf16 model, as in diffusers); the sum is fp32.
    return (x.float() + dt * velocity).to(x.dtype)


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, normalization: float | None = None) -> Tensor:
    """Classifier-free guidance cond + scale * (cond - uncond) in fp32, optionally renormalised per sample.

    `scale` counts from the conditional prediction: 0 returns `cond`. The usual convention
    uncond + s * (cond - uncond) is scale = s - 1. With `normalization`, a guided prediction whose
    norm exceeds normalization * ||cond|| (each over one whole sample) is scaled back down to that norm.
    """
    cond, uncond = cond.float(), uncond.float()
    guided = cond + scale * (cond - uncond)  # (B, ...)
    if normalization is None or normalization <= 0:
        return guided
    dims = tuple(range(1, cond.ndim))
    max_norm = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * float(normalization)  # (B, 1, ...)
    norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)  # (B, 1, ...)
    return torch.where(norm > max_norm, guided * (max_norm / norm), guided)


def initial_noise(shape: tuple[int, ...], seed: int | torch.Generator, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn on the CPU from `seed`, then moved: the same seed gives the same noise on any device.

    Equals diffusers' randn_tensor with generator=torch.Generator("cpu").manual_seed(seed) and this dtype.
    Given a CPU generator instead of a seed, draws the next numbers of its stream (for several draws per seed).
    """
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def img2img_start(sigmas: Tensor, strength: float) -> int:
    """Index of the first sigma an img2img run starts from: the last `strength` fraction of the steps remain."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise ValueError(f"strength {strength} leaves no denoising step of {steps}; raise strength or steps")
    return start


def noise_latent(latent: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The forward process sigma * noise + (1 - sigma) * latent, in the latent's dtype (diffusers' scale_noise)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latent.device).to(latent.dtype)  # 0-dim
    return sigma * noise + (1.0 - sigma) * latent


def img2img_latent(latent: Tensor, sigmas: Tensor, strength: float, seed: int | torch.Generator) -> tuple[Tensor, Tensor, int]:
    """The starting latent for img2img, the noise in it and the index of its sigma: the init image's (scaled) latent
    noised to sigmas[start]. Inpainting re-noises the known region with that same noise at every step.

    The noise is drawn as initial_noise draws it, from `seed` or from the generator the posterior sample came from.
    """
    start = img2img_start(sigmas, strength)
    noise = initial_noise(tuple(latent.shape), seed, device=latent.device, dtype=latent.dtype)  # (B, C, H, W)
    return noise_latent(latent, noise, sigmas[start]), noise, start


def inpaint_blend(latents: Tensor, known: Tensor, noise: Tensor, mask: Tensor, sigma: Tensor | float) -> Tensor:
    """Inpainting's per-step blend: `latents` (just stepped to `sigma`) where `mask` is 1, the known image elsewhere.

    The known region is the init image's clean latents `known` re-noised to `sigma` with the run's own
    initial `noise` (noise_latent), so the model sees everywhere the noise level it expects and repaints
    only the masked region; at the last step sigma is 0 and the known region is the clean image exactly.
    `mask` broadcasts over the latents (1 = repaint). diffusers' FLUX.1 and Z-Image inpainting pipelines
    blend so after every scheduler step, in the latents' dtype.
    """
    return (1 - mask) * noise_latent(known, noise, sigma) + mask * latents
