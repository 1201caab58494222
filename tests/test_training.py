"""The training loop and objectives (common/training.py): resuming, EMA, the rectified-flow loss with each family's
rule, the autoencoder run, and each family's whole run (the snapshot it writes, warm starts)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers import FluxPipeline as DiffusersFlux
from diffusers import ZImagePipeline as DiffusersZImage
from PIL import Image
from torch import nn

from zflux.common.training import (EMA, FlowRule, TrainSettings, autoencoder_loss, flow_loss, image_grid, loss_curve, train,
                                   train_autoencoder, training_sigmas)
from zflux.common.vae import Autoencoder, AutoencoderConfig, load_autoencoder
from zflux.flux.pipeline import FluxPipeline
from zflux.flux.training import flow_rule as flux_rule
from zflux.flux.training import train_flux
from zflux.zimg.pipeline import ZImagePipeline
from zflux.zimg.training import RULE as zimage_rule
from zflux.zimg.training import train_zimage
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import rel_err, same_weights, toy_run

TINY = dict(batch_size=4, lr=1e-2, minutes=5.0, warmup=2)
PROMPT = "a red circle on a blue background"


def regression(step: int):
    """Endless batches (x, y) of a fixed linear map, from batch `step` on."""
    while True:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, generator=g)
        yield x, x @ torch.tensor([[1.0], [-2.0], [0.5]])
        step += 1


def mse(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    x, y = batch
    return (model(x) + 0.01 * torch.randn(y.shape, generator=generator) - y).square().mean()


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 1)


def test_resumed_run_equals_one_run(tmp_path):
    """Two chunks of 3 steps from the checkpoint give the weights, EMA and loss log of one run of 6 steps."""
    one = train(linear(), mse, regression, TrainSettings(max_steps=6, **TINY), tmp_path / "one")
    train(linear(), mse, regression, TrainSettings(max_steps=3, **TINY), tmp_path / "two")
    two = train(linear(), mse, regression, TrainSettings(max_steps=6, **TINY), tmp_path / "two")
    assert torch.equal(one.weight, two.weight) and torch.equal(one.bias, two.bias)
    assert (tmp_path / "two" / "loss.png").is_file()
    from safetensors.torch import load_file

    logs = [load_file(tmp_path / name / "state.safetensors")["losses"] for name in ("one", "two")]
    assert len(logs[0]) == 6 and torch.equal(*logs)


def test_training_reduces_the_loss(tmp_path):
    model = linear()
    train(model, mse, regression, TrainSettings(max_steps=150, **TINY | dict(lr=0.05)), tmp_path)
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.1)


def test_budget_stops_the_chunk(tmp_path):
    train(linear(), mse, regression, TrainSettings(**TINY | dict(minutes=0.0)), tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "0"


def test_ema_warms_up():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    nn.init.ones_(model.weight)
    ema.update(model, step=0)  # decay min(0.999, 1/10): the average moves 90% of the way
    assert ema.weights["weight"].item() == pytest.approx(0.9)
    assert ema.copy(model).weight.item() == pytest.approx(0.9) and model.weight.item() == 1


@pytest.mark.parametrize("rule, time_of, target_of", [
    (zimage_rule, lambda sigma: 1 - sigma, lambda noise, x0: x0 - noise),  # Z-Image: t = 1 - sigma, predicts image - noise
    (flux_rule(128), lambda sigma: sigma, lambda noise, x0: noise - x0),  # FLUX.1: t = sigma, predicts noise - image
])
def test_flow_loss_conventions(rule, time_of, target_of):
    """A predictor that knows x0 and reads sigma back from the time as the family's convention says has zero loss
    under the family's rule, and a large one with the sign flipped."""
    latents = torch.randn(6, 16, 4, 4)

    def oracle(noisy, time):
        sigma = time_of(time).view(-1, 1, 1, 1)  # both conventions are their own inverse
        noise = (noisy - (1 - sigma) * latents) / sigma
        return target_of(noise, latents)

    assert flow_loss(oracle, latents, rule, torch.Generator().manual_seed(0)).item() < 1e-8
    flipped = FlowRule(time=rule.time, sign=-rule.sign, shift=rule.shift)
    assert flow_loss(oracle, latents, flipped, torch.Generator().manual_seed(0)).item() > 1


def test_training_sigmas_are_shifted_logit_normal():
    sigmas = training_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() < 1
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.01)  # the unshifted median 0.5 shifted by 3: 1.5 / 2


def test_autoencoder_loss_is_reconstruction_plus_kl():
    vae = Autoencoder(AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    plain = autoencoder_loss(vae, images, 0.0, torch.Generator().manual_seed(0))
    weighted = autoencoder_loss(vae, images, 1.0, torch.Generator().manual_seed(0))
    mean, logvar = vae.encoder(images).chunk(2, dim=1)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    assert weighted.item() == pytest.approx(plain.item() + kl.item(), rel=1e-5)
    plain.backward()
    assert vae.encoder.conv_in.weight.grad is not None


def test_autoencoder_run_writes_a_diffusers_vae(tmp_path):
    folder = train_autoencoder(tmp_path, TrainSettings(max_steps=2, **TINY), size=32, device=torch.device("cpu"))
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 16
    assert 0 < config["scaling_factor"] and config["shift_factor"] != 0.1159  # measured, not FLUX's
    ours, theirs = load_autoencoder(folder, dtype=torch.float32), AutoencoderKL.from_pretrained(folder)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(image), theirs(image, sample_posterior=False).sample, atol=1e-5)
    assert {p.name for p in tmp_path.glob("*.png")} == {"loss.png", "reconstructions.png"}


def test_pictures():
    curve = loss_curve([1.0 / (i + 1) for i in range(300)], "test")
    assert curve.size == (640, 360) and len(curve.getcolors()) > 2
    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    grid = image_grid(tiles, ["one", "two long label that wraps", "three"], columns=2)
    assert grid.width == 64 and grid.height > 64 and grid.getpixel((40, 5)) == (0, 0, 255)


RUNS = {  # family -> (its run, run name, ours, diffusers' pipeline, what a warm start restores, our / diffusers' sampling options)
    "z-image": (train_zimage, "z-image-turbo", ZImagePipeline, DiffusersZImage, ("transformer", "text_encoder"), {},
                dict(num_inference_steps=8, guidance_scale=0.0)),
    "flux.1": (train_flux, "flux-dev", FluxPipeline, DiffusersFlux, ("transformer", "text_encoder", "text_encoder_2"),
               dict(steps=4), dict(num_inference_steps=4, guidance_scale=3.5)),
}


@pytest.fixture(scope="module", params=RUNS)
def run(request, tmp_path_factory):
    """A family's whole recipe, two steps at 32 pixels (tests/util.py toy_run): (its RUNS entry, the snapshot it wrote)."""
    entry = RUNS[request.param]
    return entry, toy_run(tmp_path_factory.mktemp("runs"), entry[0], entry[1])


def test_run_writes_a_snapshot_diffusers_loads(run):
    """A run leaves its checkpoint, loss curve and grid, and a snapshot that diffusers' pipeline and ours load and
    sample alike (fp32, CPU: relative error <= 1e-4, as tests/test_pipelines.py)."""
    (_, name, ours_cls, ref_cls, _, ours_kwargs, ref_kwargs), snapshot = run
    assert {p.name for p in snapshot.parent.iterdir()} == {"state.safetensors", "loss.png", "grid.png", "model"}
    ours = ours_cls.from_pretrained(snapshot, device="cpu", dtype=torch.float32)
    assert ours.variant == name
    got = ours.generate(PROMPT, height=32, width=32, seed=3, output_type="latent", progress=False, **ours_kwargs)
    ref = ref_cls.from_pretrained(snapshot, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(3), **ref_kwargs).images
    assert rel_err(got, expected if ref_cls is DiffusersZImage else DiffusersFlux._unpack_latents(expected, 32, 32, 8)) <= 1e-4


def test_warm_start_from_a_snapshot(run):
    """--init: a run in a fresh folder starts from a snapshot's weights (here with no step: it writes them back unchanged)."""
    (train_transformer, _, _, _, parts, _, _), snapshot = run
    again = toy_run(snapshot.parent.parent, train_transformer, "again", steps=0, init=snapshot)
    assert again != snapshot and same_weights(snapshot, again, parts)
