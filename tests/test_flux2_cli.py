"""`zflux generate` / `info` with FLUX.2: snapshots, single files, reference images, inpainting, and the errors that
must come before any weight is loaded. Runs `main([...])` in-process on tiny random snapshots (tiny_flux2.py)."""

import shutil

import numpy as np
import pytest
from PIL import Image

from zflux.common import identify as identify_module
from zflux.common.identify import flux2_mode, flux2_variant, identify
from zflux.common.vae import from_diffusers as vae_from_diffusers
from zflux.common.weights import read_state_dict, save_state_dict
from zflux.flux.flux2.convert import from_diffusers
from zflux.flux.flux2.pipeline import Flux2Pipeline
from test_cli import CPU, fails, run
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_cli")
    return {name: flux2_snapshot(root / name, name) for name in ("flux2-klein", "flux2-klein-base", "flux2-dev")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A picture, a mask of its size, a mask of another size, and a file that is not an image."""
    root = tmp_path_factory.mktemp("flux2_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / "photo.png")
    mask = np.zeros((70, 90), dtype=np.uint8)
    mask[20:50, 30:80] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:64]).save(root / "small_mask.png")
    (root / "notes.txt").write_text("not an image")
    return root


def generate(snapshot, model: str, out, *more) -> list:
    return ["generate", "--model", model, "--weights", snapshot, "--prompt", "a cat", "--steps", 2, "--out", out, *more, *CPU]


def test_generate_text_to_image_and_editing(snapshots, images, tmp_path, capsys):
    run(*generate(snapshots["flux2-klein"], "flux2-klein-4b", tmp_path / "a.png", "--height", 32, "--width", 48))
    assert "48x32, flux2-klein-4b, seed 0" in capsys.readouterr().out
    run(*generate(snapshots["flux2-klein"], "flux2-klein-4b", tmp_path / "b.png", "--reference-image", images / "photo.png",
                  "--reference-image", images / "photo.png"))
    assert "80x64, flux2-klein-4b" in capsys.readouterr().out  # the first reference's size, cropped to multiples of 16
    run(*generate(snapshots["flux2-dev"], "flux2-dev", tmp_path / "c.png", "--height", 32, "--width", 32, "--guidance", 3.0))
    assert "32x32, flux2-dev" in capsys.readouterr().out
    assert Image.open(tmp_path / "b.png").size == (80, 64)


def test_generate_inpainting(snapshots, images, tmp_path, capsys):
    run(*generate(snapshots["flux2-klein-base"], "flux2-klein-base-4b", tmp_path / "a.png", "--init-image", images / "photo.png",
                  "--mask", images / "mask.png", "--strength", 0.7, "--guidance", 2.0))
    assert "80x64, flux2-klein-base-4b" in capsys.readouterr().out


def test_generate_from_single_files(snapshots, tmp_path, capsys):
    """BFL's layout: the transformer and ae.safetensors files beside the text-encoder folders (tiny files need their configs)."""
    snapshot, root = snapshots["flux2-klein"], tmp_path / "FLUX.2-klein"
    for name, file, convert in (("transformer", "flux-2-klein.safetensors", from_diffusers), ("vae", "ae.safetensors", vae_from_diffusers)):
        (root / name).mkdir(parents=True)
        save_state_dict(convert(read_state_dict(snapshot / name)), root / name / file)
        shutil.copy(snapshot / name / "config.json", root / name)
    for name in ("text_encoder", "tokenizer"):
        (root / name).symlink_to(snapshot / name)
    run("generate", "--model", "flux2-klein-base-4b", "--weights", root / "transformer" / "flux-2-klein.safetensors",
        "--vae", root / "vae" / "ae.safetensors", "--text-encoders", root, "--prompt", "a cat", "--height", 32, "--width", 32,
        "--steps", 2, "--out", tmp_path / "a.png", *CPU)
    assert "32x32, flux2-klein-base-4b" in capsys.readouterr().out


@pytest.mark.parametrize("model, args, message", [
    ("flux2-klein-4b", ["--reference-image", "{images}/notes.txt"], "cannot read {images}/notes.txt as an image"),
    ("flux2-klein-4b", ["--reference-image", "{images}/missing.png"], "no image file at {images}/missing.png"),
    ("flux2-klein-4b", ["--init-image", "{images}/photo.png", "--mask", "{images}/small_mask.png"],
     "--mask {images}/small_mask.png is 90x64 but --init-image is 90x70"),
    ("flux2-klein-4b", ["--mask", "{images}/mask.png"], "takes an init image and a mask together"),
    ("flux2-dev", ["--init-image", "{images}/photo.png", "--mask", "{images}/mask.png"], "inpainting runs on FLUX.2 klein"),
    ("flux2-klein-9b-kv", ["--init-image", "{images}/photo.png", "--mask", "{images}/mask.png"], "not flux2-klein-9b-kv"),
    ("flux2-klein-4b", ["--reference-image", "{images}/photo.png"] * 11, "11 reference images: FLUX.2 takes at most 10"),
])
def test_input_errors_come_before_loading(images, tmp_path, capsys, monkeypatch, model, args, message):
    monkeypatch.setattr(Flux2Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights before checking the inputs"))
    argv = generate(tmp_path, model, tmp_path / "x.png", *[a.format(images=images) for a in args])
    assert message.format(images=images) in fails(capsys, *argv)


def test_weights_errors(snapshots, tmp_path, capsys):
    gen = lambda model, weights: fails(capsys, *generate(weights, model, tmp_path / "x.png"))  # noqa: E731
    assert "is a flux2-klein-4b snapshot, not flux2-dev" in gen("flux2-dev", snapshots["flux2-klein"])
    assert "is a flux2-klein-base-4b snapshot, not flux2-klein-4b" in gen("flux2-klein-4b", snapshots["flux2-klein-base"])
    assert "is a flux2-dev snapshot, not flux2-klein-4b" in gen("flux2-klein-4b", snapshots["flux2-dev"])


def test_info_names_the_mode(snapshots, capsys, monkeypatch):
    """Distilled vs base vs KV comes from model_index.json; the tiny width stands in for klein 4B's here."""
    monkeypatch.setitem(identify_module.FLUX2_WIDTHS, (32, False), ("flux2-klein-4b", "FLUX.2 [klein] 4B (stand-in)"))
    transformer = snapshots["flux2-klein-base"] / "transformer"
    assert flux2_mode(transformer) == "base" and flux2_mode(snapshots["flux2-klein"] / "transformer") == "distilled"
    assert flux2_mode(snapshots["flux2-dev"] / "transformer") is None
    assert identify(transformer).variant == "flux2-klein-base-4b"
    assert [flux2_variant("flux2-klein-9b", m) for m in ("distilled", "base", "kv")] == \
        ["flux2-klein-9b", "flux2-klein-base-9b", "flux2-klein-9b-kv"]
    run("info", snapshots["flux2-klein-base"])
    out = capsys.readouterr().out
    assert "a diffusers Flux2KleinPipeline snapshot" in out and "the base model: 50 steps with CFG" in out
    assert "flux2-klein-4b or flux2-klein-base-4b" in out and "flux-dev" not in out  # the schedule, FLUX.2's variants only
    assert "a 4-channel autoencoder" in out and "a Qwen3 language model" in out
