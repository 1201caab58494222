"""The `zflux` command with the tools: inpainting, Fill (outpainting), Canny, Kontext, Redux end to end on tiny
snapshots, each flag checked to reach generate() (the command's image is the API's given what the flag stands for,
and another without it), and each wrong combination of flags named in one line before any weight is read."""

import numpy as np
import pytest
import torch
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxKontextPipeline
from PIL import Image

from zflux.cli import main
from zflux.common.images import load_image
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg.pipeline import ZImagePipeline
from tiny_pipelines import flux_snapshot, one_thread  # noqa: F401 (one_thread: autouse fixture)
from tiny_tools import flux_tool_snapshot, redux_snapshot, zimage_inpaint_snapshot

CPU = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-tools")
    return {"fill": flux_tool_snapshot(root / "fill", FluxFillPipeline, in_channels=384),
            "control": flux_tool_snapshot(root / "control", FluxControlPipeline, in_channels=128),
            "kontext": flux_tool_snapshot(root / "kontext", FluxKontextPipeline), "dev": flux_snapshot(root / "dev", "flux-dev"),
            "redux": redux_snapshot(root / "redux"), "z-image": zimage_inpaint_snapshot(root / "z-image"),
            "siglip": redux_snapshot(root / "other-redux", seed=1) / "image_encoder"}


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


REFUSED = None  # without the flag under test, generate() refuses the rest of the request
CASES = [  # (--model, snapshot, flags, what generate() gets for them, what it would get were the last flag ignored, image size)
    ("z-image-turbo", "z-image", ["--init-image", "photo", "--mask", "mask"], dict(init_image="photo", mask="mask"),
     dict(init_image="photo"), (64, 48)),
    ("flux-dev", "dev", ["--init-image", "photo", "--mask", "mask"], dict(init_image="photo", mask="mask"), dict(init_image="photo"),
     (64, 48)),
    ("flux-fill", "fill", ["--init-image", "photo", "--outpaint", "16,0,0,16"], dict(init_image="photo", outpaint=(16, 0, 0, 16)),
     REFUSED, (80, 64)),
    ("flux-canny", "control", ["--height", 48, "--width", 64, "--control-image", "photo", "--control-preprocess", "canny"],
     dict(height=48, width=64, control_image="photo", control_preprocess="canny"), dict(height=48, width=64, control_image="photo"),
     (64, 48)),
    ("flux-kontext", "kontext", ["--height", 32, "--width", 48, "--reference-image", "photo"],
     dict(height=32, width=48, reference_images=["photo"]), REFUSED, (1248, 832)),  # rescaled to 1024^2 pixels
    ("flux-redux", "dev", ["--height", 32, "--width", 32, "--reference-image", "photo", "--redux", "REDUX"],
     dict(height=32, width=32, reference_images=["photo"]), REFUSED, (32, 32)),
    ("flux-redux", "dev", ["--height", 32, "--width", 32, "--reference-image", "photo", "--redux", "REDUX", "--siglip", "SIGLIP"],
     dict(height=32, width=32, reference_images=["photo"]), dict(height=32, width=32, reference_images=["photo"]), (32, 32)),
]


@pytest.fixture(scope="module")
def pipelines(snapshots):
    """The pipelines the command builds, loaded through the API: the Redux ones with the snapshot's SigLIP and with another."""
    load = lambda name, variant: FluxPipeline.from_pretrained(snapshots[name], variant=variant, device="cpu", dtype=torch.float32)  # noqa: E731
    pipes = {(model, name): load(name, model) for model, name in (("flux-dev", "dev"), ("flux-fill", "fill"), ("flux-canny", "control"),
                                                                   ("flux-kontext", "kontext"))}
    pipes["z-image-turbo", "z-image"] = ZImagePipeline.from_pretrained(snapshots["z-image"], device="cpu", dtype=torch.float32)
    for siglip in ("REDUX", "SIGLIP"):
        pipes["flux-redux", siglip] = load("dev", "flux-redux")
        pipes["flux-redux", siglip].load_redux(snapshots["redux"], snapshots["redux"] if siglip == "REDUX" else snapshots["siglip"])
    return pipes


@pytest.mark.parametrize("model, snapshot, flags, settings, ignored, size", CASES, ids=[" ".join(map(str, [c[0], *c[2]])) for c in CASES])
def test_tool_flags_reach_generate(snapshots, images, pipelines, tmp_path, capsys, model, snapshot, flags, settings, ignored, size):
    """The command's image equals the API's given what the flags stand for; without the last flag the API makes another
    image, or refuses the request."""
    files = dict(photo=images / "photo.png", mask=images / "mask.png", REDUX=snapshots["redux"], SIGLIP=snapshots["siglip"])
    generate(model, snapshots[snapshot], tmp_path / "out.png", *[files.get(f, f) for f in flags])
    assert f"{size[0]}x{size[1]}, {model}" in capsys.readouterr().out
    value = lambda v: [value(x) for x in v] if isinstance(v, list) else load_image(files[v]) if v in ("photo", "mask") else v  # noqa: E731
    pipe = pipelines[model, flags[-1] if model == "flux-redux" else snapshot]  # Redux: by the SigLIP its last flag names
    api = lambda kwargs: np.asarray(pipe.generate("a photo of a cat", steps=2, progress=False,  # noqa: E731
                                                  **{k: value(v) for k, v in kwargs.items()}))
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == size and np.array_equal(np.asarray(image), api(settings))
    if ignored is REFUSED:
        with pytest.raises(ValueError):
            api({k: v for k, v in settings.items() if k not in ("outpaint", "reference_images")})
    elif model == "flux-redux":  # --siglip: the snapshot's own SigLIP instead gives another image
        assert not np.array_equal(api(settings), np.asarray(pipelines[model, "REDUX"].generate(
            "a photo of a cat", steps=2, progress=False, **{k: value(v) for k, v in settings.items()})))
    else:
        assert not np.array_equal(api(settings), api(ignored))


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
