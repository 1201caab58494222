"""The small Z-Image's training (zimg/training.py): what it learns reaches the pipeline with the right time and sign,
and a training run writes a snapshot that our pipeline and diffusers' load alike."""

import itertools

import pytest
import torch
from diffusers import ZImagePipeline as DiffusersZImage

import zflux.common.training as training
from zflux.common.training import TrainSettings, flow_loss, train, train_autoencoder
from zflux.common.vae import Autoencoder, AutoencoderConfig
from zflux.common.weights import read_state_dict
from zflux.zimg.model import ZImageConfig
from zflux.zimg.pipeline import ZImagePipeline
from zflux.zimg.text import Qwen3PromptEncoder
from zflux.zimg.training import RULE, build_denoiser, build_tokenizer, pipeline, train_zimage
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import rel_err

TINY = ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=(4, 6, 6),
                    axes_lens=(640, 8, 8))
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, max_position_embeddings=512)
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
CAPTIONS = {"a red circle on a blue background": 1.0, "a green square on a yellow background": -1.0}
PROMPT = "a red circle on a blue background"


def test_learns_what_the_caption_says(tmp_path):
    """Trained for a moment to map two captions to latents of +1 and -1, the model samples them back through the
    Turbo pipeline (8 steps from noise, on average: a tiny model this short-trained leaves some noise): the
    training's time and sign are the pipeline's, and the caption reaches the transformer through the text encoder."""
    tokenizer = build_tokenizer()
    model = build_denoiser(tokenizer, seed=0, cfg=TINY, text_encoder=TINY_TEXT)
    captions = list(CAPTIONS) * 4
    ids, mask = Qwen3PromptEncoder(model.text_encoder, tokenizer).tokens(captions, padding="longest")
    latents = torch.tensor([CAPTIONS[c] for c in captions]).view(-1, 1, 1, 1).expand(-1, 16, 4, 4)  # (8, 16, 4, 4)
    settings = TrainSettings(batch_size=8, lr=1e-2, minutes=5, max_steps=60, warmup=10, ema_decay=0.9)
    averaged = train(model, lambda m, _, g: flow_loss(lambda x, t: m(x, t, ids, mask), latents, RULE, g), itertools.repeat,
                     settings, tmp_path)
    pipe = pipeline(averaged, Autoencoder(TINY_VAE), tokenizer)
    for caption, value in CAPTIONS.items():
        out = pipe.generate(caption, height=32, width=32, seed=1, output_type="latent", progress=False)  # (1, 16, 4, 4)
        assert abs(out.mean().item() - value) < 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run of the whole recipe at 32 pixels: autoencoder, then the Z-Image (sample grid cut to two pictures)."""
    root = tmp_path_factory.mktemp("runs")
    settings = TrainSettings(batch_size=2, lr=1e-3, minutes=5, max_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:2])
        vae = train_autoencoder(root / "vae", settings, size=32, device=torch.device("cpu"))
        return root / "z-image-turbo", train_zimage(root / "z-image-turbo", vae, settings, size=32, device=torch.device("cpu"))


def test_run_writes_a_snapshot_diffusers_loads(trained):
    """The run leaves its checkpoint, loss curve and grid, and a snapshot that diffusers' ZImagePipeline and ours
    load and sample alike (fp32, CPU, 8 steps: relative error <= 1e-4, as tests/test_pipelines.py)."""
    folder, snapshot = trained
    assert {p.name for p in folder.iterdir()} == {"state.safetensors", "loss.png", "grid.png", "model"}
    ours = ZImagePipeline.from_pretrained(snapshot, device="cpu", dtype=torch.float32)
    assert ours.variant == "z-image-turbo"
    got = ours.generate(PROMPT, height=32, width=32, seed=3, output_type="latent", progress=False)
    ref = DiffusersZImage.from_pretrained(snapshot, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, height=32, width=32, num_inference_steps=8, guidance_scale=0.0, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images
    assert rel_err(got, expected) <= 1e-4


def test_warm_start_from_a_snapshot(trained, tmp_path):
    """--init: a run in a fresh folder starts from a snapshot's weights (here with no step: it writes them back unchanged)."""
    _, snapshot = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:1])
        again = train_zimage(tmp_path, snapshot.parent.parent / "vae" / "model", TrainSettings(batch_size=2, lr=1e-3, minutes=5, max_steps=0),
                     size=32, device=torch.device("cpu"), init=snapshot)
    for part in ('transformer', 'text_encoder'):
        before, after = read_state_dict(snapshot / part), read_state_dict(again / part)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
