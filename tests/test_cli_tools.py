"""The `zflux` command with the tools: inpainting, Fill (outpainting), Canny, Kontext, Redux end to end on tiny
snapshots, and each wrong combination of flags named in one line before any weight is read."""

import numpy as np
import pytest
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxKontextPipeline
from PIL import Image

from zflux.cli import main
from tiny_pipelines import flux_snapshot, one_thread  # noqa: F401 (one_thread: autouse fixture)
from tiny_tools import flux_tool_snapshot, redux_snapshot, zimage_inpaint_snapshot

CPU = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-tools")
    return {"fill": flux_tool_snapshot(root / "fill", FluxFillPipeline, in_channels=384),
            "control": flux_tool_snapshot(root / "control", FluxControlPipeline, in_channels=128),
            "kontext": flux_tool_snapshot(root / "kontext", FluxKontextPipeline), "dev": flux_snapshot(root / "dev", "flux-dev"),
            "redux": redux_snapshot(root / "redux"), "z-image": zimage_inpaint_snapshot(root / "z-image")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Image files: a 64 x 48 photo, its mask, a mask of another size."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((64, 48)).save(root / "photo.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 32))
    mask.save(root / "mask.png")
    Image.new("L", (32, 32), 255).save(root / "small_mask.png")
    return root


def run(*argv) -> None:
    main([str(a) for a in argv])


def generate(model: str, weights, out, *flags) -> None:
    run("generate", "--model", model, "--weights", weights, "--prompt", "a photo of a cat", "--steps", 2, "--out", out, *flags, *CPU)


@pytest.mark.parametrize("model, snapshot, flags, size", [
    ("z-image-turbo", "z-image", ["--init-image", "photo.png", "--mask", "mask.png"], (64, 48)),
    ("flux-fill", "fill", ["--init-image", "photo.png", "--outpaint", "16,0,0,16"], (80, 64)),
    ("flux-canny", "control", ["--control-image", "photo.png", "--preprocess", "canny"], (64, 48)),
    ("flux-kontext", "kontext", ["--reference-image", "photo.png", "--height", 32, "--width", 48], (1248, 832)),  # rescaled to 1024^2
    ("flux-redux", "dev", ["--redux", "REDUX", "--reference-image", "photo.png", "--height", 32, "--width", 32], (32, 32)),
])
def test_tools_generate(snapshots, images, tmp_path, capsys, model, snapshot, flags, size):
    flags = [snapshots["redux"] if f == "REDUX" else images / f if str(f).endswith(".png") else f for f in flags]
    generate(model, snapshots[snapshot], tmp_path / "out.png", *flags)
    assert f"{size[0]}x{size[1]}, {model}" in capsys.readouterr().out
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == size


@pytest.mark.parametrize("model, flags, message", [
    ("flux-dev", ["--init-image", "photo.png", "--mask", "small_mask.png"], "the mask is 32x32 but the image is 64x48"),
    ("z-image-turbo", ["--mask", "mask.png"], "--mask needs the --init-image it masks"),
    ("flux-canny", ["--control-image", "photo.png", "--init-image", "photo.png", "--mask", "mask.png"], "flux-canny takes no mask"),
    ("flux-kontext", ["--reference-image", "photo.png", "--init-image", "photo.png", "--mask", "mask.png"], "flux-kontext takes no mask"),
    ("flux-canny", [], "flux-canny needs a control image"),
    ("flux-depth", ["--control-image", "photo.png", "--preprocess", "canny"], "the one preprocessor is 'canny', for flux-canny"),
    ("flux-dev", ["--control-image", "photo.png"], "a control image goes with FLUX.1 Canny or Depth"),
    ("z-image-turbo", ["--control-image", "photo.png"], "--control-image needs --controlnet FILE"),
    ("flux-kontext", [], "FLUX.1 Kontext edits one reference image"),
    ("flux-redux", ["--reference-image", "photo.png"], "--model flux-redux needs --redux FOLDER"),
    ("flux-redux", ["--redux", "redux-folder"], "flux-redux needs one or more reference images"),
    ("flux-dev", ["--reference-image", "photo.png"], "flux-dev takes reference images through FLUX.1 Redux"),
    ("flux-dev", ["--redux", "redux-folder", "--reference-image", "photo.png"], "--redux goes with --model flux-redux, not flux-dev"),
    ("flux-dev", ["--init-image", "photo.png", "--outpaint", "0,0,16,0"], "outpainting needs FLUX.1 Fill (flux-fill), not flux-dev"),
    ("flux-fill", ["--init-image", "photo.png"], "FLUX.1 Fill needs an init image and a mask, or outpaint"),
    ("flux-canny", ["--control-image", "missing.png"], "no image file at missing.png"),
])
def test_flag_errors_come_before_loading(images, tmp_path, capsys, model, flags, message):
    """--weights points nowhere: each message must come from the flags' check, before anything is loaded."""
    flags = [images / f if str(f).endswith(".png") and f != "missing.png" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        generate(model, tmp_path / "no-weights-needed", tmp_path / "out.png", *flags)
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_outpaint_flag_format(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate("flux-fill", tmp_path, tmp_path / "out.png", "--init-image", "x.png", "--outpaint", "16,0,0")
    assert "expected LEFT,TOP,RIGHT,BOTTOM" in capsys.readouterr().err


def test_info_tells_kontext_from_dev(snapshots, capsys):
    run("info", snapshots["kontext"])
    out = capsys.readouterr().out
    assert "a diffusers FluxKontextPipeline snapshot" in out and "FLUX.1 Kontext (in-context editing; dev's shapes, named Kontext)" in out
    run("info", snapshots["dev"] / "transformer")
    assert "nothing here names it Kontext" in capsys.readouterr().out
