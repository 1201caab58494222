"""The small FLUX.1's training (flux/training.py): what it learns reaches the pipeline with the right time and sign,
and a training run writes a snapshot that our pipeline and diffusers' load alike."""

import itertools
import math

import pytest
import torch
from diffusers import FluxPipeline as DiffusersFlux

import zflux.common.training as training
from zflux.common.training import TrainSettings, flow_loss, train, train_autoencoder
from zflux.common.vae import Autoencoder, AutoencoderConfig
from zflux.common.weights import read_state_dict
from zflux.flux.model import FluxConfig
from zflux.flux.pipeline import FluxPipeline
from zflux.flux.text import FluxPromptEncoder
from zflux.flux.training import build_denoiser, build_tokenizers, flow_rule, pipeline, train_flux
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import rel_err

TINY = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                 projection_dim=16)
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
CAPTIONS = {"a red circle on a blue background": 1.0, "a green square on a yellow background": -1.0}
PROMPT = "a red circle on a blue background"


def test_shift_is_devs_at_the_training_size():
    """128 pixels: 64 image tokens, mu = 0.5 + (64 - 256) * 0.65 / 3840, as FluxPipeline computes it."""
    assert flow_rule(128).shift == pytest.approx(math.exp(0.5 + (64 - 256) * 0.65 / 3840))


def test_learns_what_the_caption_says(tmp_path):
    """Trained for a moment to map two captions to latents of +1 and -1, the model samples them back through the
    dev pipeline (8 steps from noise, on average): the training's time and sign are the pipeline's, and the caption
    reaches the transformer through T5 and CLIP."""
    t5_tokenizer, clip_tokenizer = build_tokenizers()
    model = build_denoiser(t5_tokenizer, clip_tokenizer, seed=0, cfg=TINY, t5=TINY_T5, clip=TINY_CLIP)
    captions = list(CAPTIONS) * 4
    t5_ids, clip_ids = FluxPromptEncoder(model.t5, t5_tokenizer, model.clip, clip_tokenizer).tokens(captions)
    latents = torch.tensor([CAPTIONS[c] for c in captions]).view(-1, 1, 1, 1).expand(-1, 16, 4, 4)  # (8, 16, 4, 4)
    guidance = torch.full((8,), 3.5)
    settings = TrainSettings(batch_size=8, lr=1e-2, minutes=5, max_steps=60, warmup=10, ema_decay=0.9)
    averaged = train(model, lambda m, _, g: flow_loss(lambda x, t: m(x, t, t5_ids, clip_ids, guidance), latents, flow_rule(32), g),
                     itertools.repeat, settings, tmp_path)
    pipe = pipeline(averaged, Autoencoder(TINY_VAE), t5_tokenizer, clip_tokenizer)
    for caption, value in CAPTIONS.items():
        out = pipe.generate(caption, height=32, width=32, steps=8, seed=1, output_type="latent", progress=False)  # (1, 16, 4, 4)
        assert abs(out.mean().item() - value) < 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run of the whole recipe at 32 pixels: autoencoder, then the FLUX.1 (sample grid cut to two pictures)."""
    root = tmp_path_factory.mktemp("runs")
    settings = TrainSettings(batch_size=2, lr=1e-3, minutes=5, max_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:2])
        vae = train_autoencoder(root / "vae", settings, size=32, device=torch.device("cpu"))
        return root / "flux-dev", train_flux(root / "flux-dev", vae, settings, size=32, device=torch.device("cpu"))


def test_run_writes_a_snapshot_diffusers_loads(trained):
    """The run leaves its checkpoint, loss curve and grid, and a snapshot that diffusers' FluxPipeline and ours
    load and sample alike (fp32, CPU, 4 steps: relative error <= 1e-4, as tests/test_pipelines.py)."""
    folder, snapshot = trained
    assert {p.name for p in folder.iterdir()} == {"state.safetensors", "loss.png", "grid.png", "model"}
    ours = FluxPipeline.from_pretrained(snapshot, device="cpu", dtype=torch.float32)
    assert ours.variant == "flux-dev"
    got = ours.generate(PROMPT, height=32, width=32, steps=4, seed=3, output_type="latent", progress=False)
    ref = DiffusersFlux.from_pretrained(snapshot, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images
    assert rel_err(got, DiffusersFlux._unpack_latents(expected, 32, 32, 8)) <= 1e-4


def test_warm_start_from_a_snapshot(trained, tmp_path):
    """--init: a run in a fresh folder starts from a snapshot's weights (here with no step: it writes them back unchanged)."""
    _, snapshot = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:1])
        again = train_flux(tmp_path, snapshot.parent.parent / "vae" / "model", TrainSettings(batch_size=2, lr=1e-3, minutes=5, max_steps=0),
                     size=32, device=torch.device("cpu"), init=snapshot)
    for part in ('transformer', 'text_encoder', 'text_encoder_2'):
        before, after = read_state_dict(snapshot / part), read_state_dict(again / part)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
