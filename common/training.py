"""Training zflux's small models: the rectified-flow objective, the autoencoder objective and one loop for both.

Rectified flow: a latent x0 and noise n meet on the straight line x_sigma = sigma * n + (1 - sigma) * x0;
the transformer learns the velocity along it. Each family says how its transformer sees that line (a
FlowRule): the time it is given for sigma, the sign of what it predicts (FLUX.1: n - x0; Z-Image:
x0 - n, at time 1 - sigma) and how far its sampler shifts sigmas towards noise. Training draws sigma
from a logit-normal shifted the same way, so it spends its steps where sampling does.

The loop (train) runs any such objective: AdamW, bf16 autocast on the GPU, gradient clipping, an EMA
copy of the weights, periodic sample pictures, a loss curve drawn as a PNG, a tqdm bar with the loss,
and a checkpoint (weights, EMA, optimizer moments, losses) in one safetensors file that a later run
resumes from. It stops at a wall-clock budget, so that each chunk of a long run fits a time slot.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from zflux.common.data import SceneDataset, batches, to_signed
from zflux.common.images import to_pil
from zflux.common.sampling import SchedulerConfig, shift_sigmas
from zflux.common.shapes import HELD_OUT, Scene, caption
from zflux.common.vae import LOGVAR_RANGE, Autoencoder, AutoencoderConfig, save_autoencoder
from zflux.common.weights import config_to_dict, save_model_folder

if TYPE_CHECKING:  # transformers loads when a run builds its models (common/text.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_FILE = "state.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers whose classes the saved snapshots name (and were tested with)
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# The shipped autoencoder: FLUX.1's architecture (16 channels, 8x down) at 1/16 to 1/8 of its widths: 1.3 M parameters.
AUTOENCODER = AutoencoderConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16)
KL_WEIGHT = 1e-4  # per-element KL against per-element L1: enough to keep the posterior from collapsing to a point
# The posterior's log-variance starts here (std 0.05), not at 0: with unit noise on every latent the decoder
# learns through heavy noise at first (on the CPU, 300 steps: L1 0.25 from 0, 0.16 from -6).
LOGVAR_INIT = -6.0
LOG_EVERY = 25  # steps between reading the loss back from the device (each read waits for the GPU)


SHOWCASE = [  # (scene, caption language) for the sample grids: seen and held-out combinations, every caption feature
    (Scene("red", "circle", "blue"), "en"), (Scene("yellow", "triangle", "black"), "en"), (Scene("white", "square", "purple"), "en"),
    (Scene("green", "circle", "blue"), "en"), (Scene("orange", "square", "white"), "zh"), (Scene("purple", "triangle", "black"), "zh"),
    (Scene("black", "square", "yellow"), "en"), (Scene("blue", "circle", "yellow", size="small", place="left"), "en"),
    (Scene("red", "triangle", "white", size="large"), "en"), (Scene("green", "square", "orange", place="top"), "en"),
    (Scene("yellow", "circle", "purple", place="bottom", word="sun"), "en"), (Scene("white", "triangle", "red", word="hello"), "en"),
    (Scene("orange", "circle", "blue", size="small", place="right"), "zh"), (Scene("red", "square", "green", word="zflux"), "zh"),
    (Scene("purple", "circle", "white"), "en"), (Scene("black", "triangle", "green", size="large"), "en"),
]


@dataclass(frozen=True)
class FlowRule:
    """How a family's transformer is trained on x_sigma = sigma * noise + (1 - sigma) * x0."""

    time: Callable[[Tensor], Tensor]  # sigma (B,) -> the time the transformer is given
    sign: float  # +1: it predicts noise - x0 (FLUX.1); -1: x0 - noise (Z-Image)
    shift: float  # the sampler's sigma shift at the training size; training sigmas are shifted alike


def training_sigmas(batch: int, shift: float, generator: torch.Generator) -> Tensor:
    """(B,) sigmas from a standard logit-normal, shifted towards noise by `shift` (SD3's time sampling)."""
    logits = torch.randn(batch, generator=generator, device=generator.device)  # (B,)
    return shift_sigmas(torch.sigmoid(logits), shift)


def flow_loss(predict: Callable[[Tensor, Tensor], Tensor], latents: Tensor, rule: FlowRule, generator: torch.Generator) -> Tensor:
    """Mean squared error of `predict(x_sigma, time)` against the velocity of a batch of (scaled) latents (B, ...)."""
    sigmas = training_sigmas(latents.shape[0], rule.shift, generator)  # (B,)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)  # (B, ...)
    s = sigmas.view(-1, *[1] * (latents.ndim - 1))  # (B, 1, ...)
    noisy = s * noise + (1 - s) * latents
    return F.mse_loss(predict(noisy, rule.time(sigmas)).float(), rule.sign * (noise - latents))


def autoencoder_loss(vae: Autoencoder, images: Tensor, kl_weight: float, generator: torch.Generator) -> Tensor:
    """L1 reconstruction of a posterior sample plus `kl_weight` times its KL divergence from N(0, 1), both per element."""
    mean, logvar = vae.encoder(images).chunk(2, dim=1)  # each (B, C, H/8, W/8)
    logvar = logvar.float().clamp(*LOGVAR_RANGE)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    latent = mean.float() + torch.exp(0.5 * logvar) * noise
    reconstruction = vae.decoder(latent)  # (B, 3, H, W)
    kl = 0.5 * (mean.float().square() + logvar.exp() - 1 - logvar).mean()
    return (reconstruction.float() - images).abs().mean() + kl_weight * kl


def picture_latents(vae: Autoencoder, pictures: Tensor) -> Tensor:
    """uint8 pictures (B, 3, H, W) -> the scaled latents the transformers learn, (B, C, H/8, W/8) fp32.

    The posterior mean, shifted and scaled as the pipelines do: (z - shift_factor) * scaling_factor.
    """
    raw = vae.encode(to_signed(pictures.to(vae.decoder.conv_in.weight.device)))  # (B, C, h, w)
    return (raw.float() - vae.cfg.shift_factor) * vae.cfg.scaling_factor


@dataclass(frozen=True)
class TrainSettings:
    """One training run: its optimizer, its EMA, how long this chunk may take and what it leaves behind."""

    batch_size: int
    lr: float
    minutes: float  # this chunk's wall-clock budget for the loop; the final save and samples come after
    max_steps: int | None = None  # the run ends for good here (None: only budgets end chunks)
    warmup: int = 200  # steps of linear learning-rate warm-up
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    sample_every: int = 2000  # steps between sample pictures
    save_every: float = 2.0  # minutes between checkpoints (and one at the end)
    seed: int = 0


# The autoencoder's run (`zflux train autoencoder`): small convolutions learn fast at a high rate.
AUTOENCODER_SETTINGS = TrainSettings(batch_size=64, lr=1e-3, minutes=8.0)


class EMA:
    """An exponential moving average of a model's trainable weights, decay warmed up as (1 + n) / (10 + n)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        # One fused update over all tensors (as torch.optim.swa_utils' EMA does), not a kernel per tensor.
        torch._foreach_lerp_(list(self.weights.values()), [params[n].detach() for n in self.weights], 1 - decay)

    def copy(self, model: nn.Module) -> nn.Module:
        """A copy of `model` holding the averaged weights, in eval mode."""
        averaged = copy.deepcopy(model).eval().requires_grad_(False)
        params = dict(averaged.named_parameters())
        with torch.no_grad():
            for name, weight in self.weights.items():
                params[name].copy_(weight)
        return averaged


def save_state(path: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
    """Everything a later run resumes from, in one safetensors file (written aside, then renamed)."""
    tensors = {"losses": torch.tensor(losses, dtype=torch.float32)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            moments = optimizer.state.get(p, {})
            tensors[f"model.{name}"] = p.detach()
            tensors[f"ema.{name}"] = ema.weights[name]
            tensors |= {f"adam.{name}.{k}": moments[k] for k in ("exp_avg", "exp_avg_sq") if k in moments}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"step": str(step)})
    partial.replace(path)


def load_state(path: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """Restore what save_state wrote into `model`, `ema` and `optimizer`; return (step, losses)."""
    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(str(path))
    moments = {}
    with torch.no_grad():
        for i, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(tensors[f"model.{name}"])
            ema.weights[name].copy_(tensors[f"ema.{name}"])
            if f"adam.{name}.exp_avg" in tensors:
                moments[i] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"adam.{name}.exp_avg"],
                              "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"]}
    optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    return step, tensors["losses"].tolist()


class LossLog:
    """Per-step losses, read back from the device LOG_EVERY at a time (each read waits for the GPU)."""

    def __init__(self, values: list[float]):
        self.values = values
        self.pending: list[Tensor] = []

    def add(self, loss: Tensor) -> bool:
        """Record one step's loss; True when the values were just brought up to date."""
        self.pending.append(loss.detach())
        return len(self.pending) >= LOG_EVERY and bool(self.flush())

    def flush(self) -> list[float]:
        """Every loss so far, as floats."""
        if self.pending:
            self.values += torch.stack(self.pending).tolist()
            self.pending.clear()
        return self.values


def train(model: nn.Module, loss_fn: Callable[[nn.Module, object, torch.Generator], Tensor], data: Callable[[int], Iterator],
          settings: TrainSettings, folder: Path, sample: Callable[[nn.Module], Image.Image] | None = None,
          name: str = "train") -> nn.Module:
    """Train `model` (on its device) in `folder`, resuming from its checkpoint there; return the EMA copy.

    `data(step)` gives the batches from that step on; `loss_fn(model, batch, generator)` the loss of
    one. `sample(ema_model)` draws a picture, saved as samples-<step>.png every `sample_every`
    steps. The loss curve is loss.png.
    """
    start = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    ema = EMA(model, settings.ema_decay)
    step, losses = load_state(folder / STATE_FILE, model, ema, optimizer) if (folder / STATE_FILE).exists() else (0, [])
    log, saved, batches = LossLog(losses), time.monotonic(), data(step)
    model.train()
    with tqdm(total=settings.max_steps, initial=step, desc=name, unit="step") as bar:
        while (settings.max_steps is None or step < settings.max_steps) and time.monotonic() - start < settings.minutes * 60:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup)
            generator = torch.Generator(device).manual_seed(settings.seed * 1_000_003 + step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model, next(batches), generator)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model, step)
            step += 1
            bar.update()
            if log.add(loss):
                bar.set_postfix(loss=f"{sum(log.values[-LOG_EVERY:]) / LOG_EVERY:.4f}")
            if sample and step % settings.sample_every == 0:
                sample(ema.copy(model)).save(folder / f"samples-{step:06d}.png")
            if time.monotonic() - saved > settings.save_every * 60:
                save_state(folder / STATE_FILE, model, ema, optimizer, step, log.flush())
                saved = time.monotonic()
    save_state(folder / STATE_FILE, model, ema, optimizer, step, log.flush())
    loss_curve(log.values, name).save(folder / "loss.png")
    return ema.copy(model)


def train_autoencoder(folder: Path, settings: TrainSettings, size: int, device: torch.device, workers: int = 0) -> Path:
    """Train the small autoencoder (AUTOENCODER) on scene pictures in `folder`, resuming there.

    Its latent statistics (shift_factor, scaling_factor) are measured on 256 pictures at the end, and
    the EMA weights written as a diffusers `vae/` folder, folder/model, which is returned, with eight
    pictures over their reconstructions in folder/reconstructions.png.
    """
    torch.manual_seed(settings.seed)
    vae = Autoencoder(AUTOENCODER).to(device)
    with torch.no_grad():
        vae.encoder.conv_out.bias[AUTOENCODER.latent_channels:] = LOGVAR_INIT  # the second half of its output: log-variances
    dataset = SceneDataset(size, seed=settings.seed)
    shown = torch.stack([dataset[i][0] for i in range(8)])  # (8, 3, S, S) uint8

    def loss(model: Autoencoder, batch: tuple[Tensor, list[str]], generator: torch.Generator) -> Tensor:
        return autoencoder_loss(model, to_signed(batch[0].to(device)), KL_WEIGHT, generator)

    def sample(model: Autoencoder) -> Image.Image:  # the pictures over their reconstructions
        return image_grid(to_pil(torch.cat([to_signed(shown), model(to_signed(shown).to(device)).cpu()])), columns=8)

    averaged = train(vae, loss, lambda step: batches(dataset, settings.batch_size, step, workers), settings, folder, sample,
                     name="autoencoder")
    sample(averaged).save(folder / "reconstructions.png")
    pictures = next(batches(SceneDataset(size, seed=settings.seed + 1), 256))[0]  # (256, 3, S, S), unseen samples
    averaged.cfg = replace(AUTOENCODER, scaling_factor=1.0, shift_factor=0.0)
    raw = picture_latents(averaged, pictures)  # (256, C, h, w), unscaled
    averaged.cfg = replace(AUTOENCODER, shift_factor=raw.mean().item(), scaling_factor=1 / raw.std().item())
    return save_autoencoder(averaged, folder / "model")


def save_snapshot(folder: Path, pipeline: str, transformer: tuple[str, dict[str, Tensor], object], vae: Path,
                  scheduler: SchedulerConfig, text: dict[str, PreTrainedModel | PreTrainedTokenizerBase]) -> Path:
    """Write a diffusers snapshot folder of class `pipeline`, replacing any there, weights in bf16.

    `transformer` is (diffusers class name, state dict in diffusers' layout, config dataclass); `vae` a
    trained vae/ folder, copied; `text` the text encoders and tokenizers by subfolder name.
    """
    if folder.exists():
        shutil.rmtree(folder)
    class_name, state_dict, config = transformer
    save_model_folder(folder / "transformer", state_dict, config_to_dict(config, class_name))
    shutil.copytree(vae, folder / "vae")
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, "transformer": ["diffusers", class_name],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", SCHEDULER_CLASS]}
    for name, part in text.items():
        if isinstance(part, nn.Module):
            copy.deepcopy(part).to(torch.bfloat16).save_pretrained(folder / name)
            index[name] = ["transformers", type(part).__name__]
        else:
            part.save_pretrained(folder / name)
            index[name] = ["transformers", "PreTrainedTokenizerFast"]  # the name transformers 4 and 5 both know
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config_to_dict(scheduler, SCHEDULER_CLASS), indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def prompt_grid(pipe, size: int, seed: int = 0) -> Image.Image:
    """The SHOWCASE scenes as `pipe` draws them from their captions (`size` pixels, one seed), labelled.

    `pipe` is any family's pipeline; Chinese captions are labelled with their English twin (the
    label font has no Chinese glyphs), and combinations never seen in training are marked.
    """
    images, labels = [], []
    for scene, language in SHOWCASE:
        images.append(pipe.generate(caption(scene, language), height=size, width=size, seed=seed, progress=False))
        notes = [note for note, on in (("zh", language == "zh"), ("unseen", scene.triple in HELD_OUT)) if on]
        labels.append(caption(scene) + (f" [{', '.join(notes)}]" if notes else ""))
    return image_grid(images, labels)


def loss_curve(losses: list[float], title: str, width: int = 640, height: int = 360) -> Image.Image:
    """The loss per step (faint) and its running mean over ~1% of the run (bold), log scale, as a picture."""
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    left, top, right, bottom = 60, 24, width - 16, height - 30
    pen.rectangle((left, top, right, bottom), outline="black")
    pen.text((left, 6), f"{title}: loss over {len(losses)} steps", fill="black", font=font)
    if len(losses) < 2:
        return image
    logs = [math.log10(max(v, 1e-8)) for v in losses]
    window = max(1, len(logs) // 100)
    smooth = [sum(logs[max(0, i - window + 1): i + 1]) / len(logs[max(0, i - window + 1): i + 1]) for i in range(len(logs))]
    lo, hi = min(logs), max(logs) + 1e-6
    point = lambda i, v: (left + (right - left) * i / (len(logs) - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))
    pen.line([point(i, v) for i, v in enumerate(logs)], fill=(180, 200, 235), width=1)
    pen.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    for v in (lo, hi):
        pen.text((4, point(0, v)[1] - 6), f"{10 ** v:.3g}", fill="black", font=font)
    pen.text((left, bottom + 8), "step 0", fill="black", font=font)
    pen.text((right - 70, bottom + 8), f"step {len(logs)}", fill="black", font=font)
    return image


def image_grid(images: list[Image.Image], labels: list[str] | None = None, columns: int = 4) -> Image.Image:
    """Tiles in rows of `columns`, each with its label (wrapped) underneath when labels are given."""
    width, height = images[0].size
    font = ImageFont.load_default(size=11)
    lines = [textwrap.wrap(label, width=max(8, width // 6)) for label in labels] if labels else [[] for _ in images]
    label_height = 13 * max(map(len, lines)) + (4 if labels else 0)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    pen = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, lines)):
        x, y = (i % columns) * width, (i // columns) * (height + label_height)
        grid.paste(image, (x, y))
        for j, line in enumerate(text):
            pen.text((x + 2, y + height + 2 + 13 * j), line, fill="black", font=font)
    return grid
