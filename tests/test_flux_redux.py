"""FLUX.1 Redux: the projector against diffusers' ReduxImageEncoder, and the whole prior (SigLIP features through
the projector, appended after the prompt's T5 tokens, scaled) against diffusers' FluxPriorReduxPipeline.

Tolerance: fp32 on the CPU. The projector is the same two Linear layers and SiLU: bit-exact. The prior
runs transformers' own SigLIP and image processor on both sides and our T5/CLIP prompt encoder
(test_text.py): <= 1e-6 relative (measured: 0, bit-exact).
"""

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPriorReduxPipeline, ReduxImageEncoder
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from zflux.flux.text import FluxPromptEncoder
from zflux.common.weights import CheckpointError, save_state_dict
from zflux.flux.redux import ReduxConfig, ReduxImageEncoder as OurEncoder, ReduxProjector, load_projector, redux_conditioning
from tiny_pipelines import TEXT_DIM, flux_snapshot, one_thread  # noqa: F401 (one_thread: autouse fixture)
from tiny_tools import SIGLIP, SIGLIP_TOKENS, redux_snapshot
from util import randomize_, rel_err

PROMPT = "a photo of a cat"
TOL = 1e-6  # see the module docstring


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux")
    return {"redux": redux_snapshot(root / "redux"), "base": flux_snapshot(root / "base", "flux-dev")}


def image(width: int = 40, height: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_default_config_is_flux1_redux_dev():
    assert ReduxConfig() == ReduxConfig(redux_dim=1152, txt_in_features=4096)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ReduxProjector().state_dict().items()}
        expected = {k: tuple(v.shape) for k, v in ReduxImageEncoder().state_dict().items()}
    assert shapes == expected == {"redux_up.weight": (12288, 1152), "redux_up.bias": (12288,),
                                  "redux_down.weight": (4096, 12288), "redux_down.bias": (4096,)}


@pytest.mark.parametrize("layout", ["snapshot", "image_embedder", "single file"])
def test_projector_matches_diffusers(folders, tmp_path, layout):
    reference = ReduxImageEncoder.from_pretrained(folders["redux"] / "image_embedder")
    path = {"snapshot": folders["redux"], "image_embedder": folders["redux"] / "image_embedder",
            "single file": tmp_path / "flux1-redux-dev.safetensors"}[layout]
    save_state_dict(reference.state_dict(), tmp_path / "flux1-redux-dev.safetensors")  # BFL's file: the same names
    ours = load_projector(path, dtype=torch.float32)
    assert ours.cfg == ReduxConfig(redux_dim=SIGLIP["hidden_size"], txt_in_features=TEXT_DIM)
    x = torch.randn(2, 5, SIGLIP["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x).image_embeds)


def prior(folders) -> FluxPriorReduxPipeline:
    """diffusers' Redux prior with the base snapshot's text encoders, as its documentation loads it."""
    base = folders["base"]
    pipe = FluxPriorReduxPipeline.from_pretrained(
        folders["redux"], text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"), tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(base / "text_encoder_2"), tokenizer_2=T5TokenizerFast.from_pretrained(base / "tokenizer_2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("n_images, prompt_scale, pooled_scale", [(1, 1.0, 1.0), (1, 0.7, 1.3), (2, 0.5, 0.25)])
def test_prior_matches_diffusers(folders, n_images, prompt_scale, pooled_scale):
    images = [image(seed=i, width=40 + 8 * i) for i in range(n_images)]
    expected = prior(folders)(image=images if n_images > 1 else images[0], prompt=PROMPT, prompt_embeds_scale=prompt_scale,
                              pooled_prompt_embeds_scale=pooled_scale)

    encoder = OurEncoder.from_pretrained(folders["redux"], folders["redux"], dtype=torch.float32)
    tokens = encoder(images)
    assert tokens.shape == (n_images, SIGLIP_TOKENS, TEXT_DIM)
    features, pooled = FluxPromptEncoder.from_snapshot(folders["base"], dtype=torch.float32)(PROMPT, 512)
    txt, vec = redux_conditioning(features, pooled, tokens, prompt_scale, pooled_scale)
    assert txt.shape == expected.prompt_embeds.shape == (1, 512 + SIGLIP_TOKENS, TEXT_DIM)
    assert rel_err(txt, expected.prompt_embeds) <= TOL and rel_err(vec, expected.pooled_prompt_embeds) <= TOL


def test_siglip_folder_may_be_the_model_repo(folders, tmp_path):
    """google/siglip-so400m-patch14-384 keeps preprocessor_config.json beside the model; a snapshot keeps it in feature_extractor/."""
    shutil.copytree(folders["redux"] / "image_encoder", tmp_path / "siglip")
    shutil.copy(folders["redux"] / "feature_extractor" / "preprocessor_config.json", tmp_path / "siglip")
    a = OurEncoder.from_pretrained(folders["redux"] / "image_embedder", tmp_path / "siglip", dtype=torch.float32)
    b = OurEncoder.from_pretrained(folders["redux"], folders["redux"] / "image_encoder", dtype=torch.float32)
    assert torch.equal(a([image()]), b([image()]))


def test_loading_errors(folders, tmp_path):
    with pytest.raises(CheckpointError, match="no redux_up.weight"):
        load_projector(folders["base"] / "vae")
    save_state_dict({"redux_up.weight": torch.zeros(96, 16), "redux_up.bias": torch.zeros(96)}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_projector(tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        OurEncoder.from_pretrained(folders["redux"], tmp_path)
    with pytest.raises(CheckpointError, match="no SigLIP folder at .*half.safetensors: pass the SigLIP model folder"):
        OurEncoder.from_pretrained(tmp_path / "half.safetensors", tmp_path / "half.safetensors")  # a file brings no SigLIP
    wide = randomize_(ReduxImageEncoder(redux_dim=24, txt_in_features=TEXT_DIM))
    save_state_dict(wide.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="gives 16-wide features; the Redux projector reads 24"):
        OurEncoder.from_pretrained(tmp_path / "wide.safetensors", folders["redux"])
