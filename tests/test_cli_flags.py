"""Every flag of `zflux generate`, and ZFLUX_BACKEND, does what it says: each test fails if the flag were ignored.

A flag that changes the image is run through the command and compared, pixel for pixel, with the
Python API given the setting it stands for; that image must differ from the one the API makes
without the setting, so the comparison would see the flag dropped. Flags that leave the image
alone (--device, --offload-text-encoder, --backend) are checked by what they change instead.
--model, --weights, --vae, --text-encoders, --prompt, --height, --width and --out: test_cli.py; --controlnet and
--reference-image: test_zimg_pipelines.py::test_cli_controlnet_and_omni; the FLUX.1 tools' and base-model inpainting's
(--mask, --control-image, --control-preprocess, --outpaint, --reference-image, --redux, --siglip):
test_cli_tools.py::test_tool_flags_reach_generate.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from zflux import cli
from zflux.cli import main
from zflux.common import attention
from zflux.common.offload import Offload
from zflux.flux.pipeline import FluxPipeline
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from tiny_zimage_tasks import controlnet_snapshot
from zflux.zimg import pipeline as zimage_pipeline
from zflux.zimg.pipeline import ZImagePipeline

PROMPT = "a photo of a cat"
SIZE = dict(height=32, width=32)
FP32 = dict(device="cpu", dtype=torch.float32)
PIPELINES = {"z-image-turbo": ZImagePipeline, "z-image": ZImagePipeline, "flux-dev": FluxPipeline,
             "z-image-turbo+controlnet": ZImagePipeline}  # snapshot -> pipeline; --model is the name before a "+"
CONTROL = dict(control_image="{control}")
INPAINT = dict(control_image="{control}", init_image="{init}")
REFUSED = None  # without the flag under test, generate() refuses the other settings

CASES = [  # (snapshot, the flags, what generate() gets for them, what it would get were the flag under test ignored)
    ("z-image-turbo", ["--seed", "5"], dict(seed=5), dict()),
    ("z-image-turbo", ["--steps", "3"], dict(steps=3), dict(steps=8)),  # Turbo's default
    ("z-image-turbo", ["--init-image", "{init}"], dict(init_image="{init}"), dict()),
    ("z-image-turbo", ["--init-image", "{init}", "--strength", "0.5"], dict(init_image="{init}", strength=0.5),
     dict(init_image="{init}")),
    ("z-image", ["--guidance", "2"], dict(guidance=2.0), dict()),
    ("z-image", ["--negative-prompt", "blurry"], dict(negative_prompt="blurry"), dict()),
    ("z-image", ["--cfg-normalization", "0.5"], dict(cfg_normalization=0.5), dict()),
    ("z-image", ["--cfg-truncation", "0.1"], dict(cfg_truncation=0.1), dict()),  # CFG off for the second of 2 steps
    ("flux-dev", ["--guidance", "5"], dict(guidance=5.0), dict()),
    ("flux-dev", ["--true-cfg", "2"], dict(true_cfg=2.0), dict()),
    ("flux-dev", ["--true-cfg", "2", "--negative-prompt", "blurry"], dict(true_cfg=2.0, negative_prompt="blurry"),
     dict(true_cfg=2.0)),
    ("z-image-turbo+controlnet", ["--control-image", "{control}"], CONTROL, dict()),
    ("z-image-turbo+controlnet", ["--control-image", "{control}", "--control-scale", "0.3"], CONTROL | dict(control_scale=0.3),
     CONTROL),
    ("z-image-turbo+controlnet", ["--control-image", "{control}", "--control-preprocess", "canny"],
     CONTROL | dict(control_preprocess="canny"), CONTROL),
    ("z-image-turbo+controlnet", ["--control-image", "{control}", "--init-image", "{init}", "--mask", "{mask}"],
     INPAINT | dict(mask="{mask}"), REFUSED),
]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    folders = {variant: (zimage_snapshot if variant.startswith("z") else flux_snapshot)(root / variant, variant)
               for variant in ("z-image-turbo", "z-image", "flux-dev")}
    return folders | {"z-image-turbo+controlnet": controlnet_snapshot(root / "controlnet", folders["z-image-turbo"])}


@pytest.fixture(scope="module")
def pipelines(snapshots):
    return {name: cls.from_pretrained(snapshots[name], **FP32) for name, cls in PIPELINES.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Image files for the flags that take one: random 32 x 32 pictures, and a mask whose left half is white (repaint)."""
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    files = {name: root / f"{name}.png" for name in ("init", "control", "mask")}
    for name in ("init", "control"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[name])
    Image.fromarray(np.repeat([[255] * 16 + [0] * 16], 32, axis=0).astype(np.uint8)).save(files["mask"])
    return {name: str(path) for name, path in files.items()}


def generate(snapshots, tmp_path, snapshot: str, *flags: str) -> np.ndarray:
    """The pixels `zflux generate` writes from `snapshot` with `flags` (32 x 32, 2 steps unless the flags say otherwise)."""
    out = tmp_path / "out.png"
    steps = [] if "--steps" in flags else ["--steps", "2"]
    main(["generate", "--model", snapshot.split("+")[0], "--weights", str(snapshots[snapshot]), "--prompt", PROMPT,
          "--height", "32", "--width", "32", *steps, "--out", str(out), "--device", "cpu", "--dtype", "fp32", *flags])
    with Image.open(out) as image:
        return np.asarray(image)


def api(pipe, **settings) -> np.ndarray:
    return np.asarray(pipe.generate(PROMPT, **(dict(steps=2) | SIZE | settings), progress=False))


@pytest.mark.parametrize("snapshot, flags, settings, ignored", CASES, ids=[re.sub(r" \{\w+\}", "", " ".join(c[1])) for c in CASES])
def test_flag_reaches_generate(snapshots, pipelines, images, tmp_path, snapshot, flags, settings, ignored):
    fill = lambda d: {k: v.format(**images) if isinstance(v, str) else v for k, v in d.items()}  # noqa: E731
    image = generate(snapshots, tmp_path, snapshot, *(f.format(**images) for f in flags))
    expected = api(pipelines[snapshot], **fill(settings))
    assert np.array_equal(image, expected)
    if ignored is REFUSED:
        with pytest.raises(ValueError):
            api(pipelines[snapshot], **fill(INPAINT))
    else:
        assert not np.array_equal(expected, api(pipelines[snapshot], **fill(ignored)))


def test_dtype(snapshots, tmp_path):
    """--dtype bf16 runs the models in bf16 (the tests' fp32 everywhere else would hide a dropped flag)."""
    image = generate(snapshots, tmp_path, "z-image-turbo", "--dtype", "bf16")  # after generate()'s fp32: the last one wins
    bf16 = ZImagePipeline.from_pretrained(snapshots["z-image-turbo"], device="cpu", dtype=torch.bfloat16)
    assert np.array_equal(image, api(bf16))
    assert not np.array_equal(image, generate(snapshots, tmp_path, "z-image-turbo"))


def test_device(snapshots, tmp_path, monkeypatch):
    """--device is where the weights go: the pipeline never falls back to its default device."""
    monkeypatch.setattr(zimage_pipeline, "default_device", lambda: pytest.fail("--device was ignored"))
    generate(snapshots, tmp_path, "z-image-turbo")


@pytest.mark.parametrize("flags, mode", [([], "none"), (["--offload-text-encoder"], "text-encoder"), (["--offload", "model"], "model"),
                                         (["--offload", "blocks"], "blocks"), (["--offload", "auto"], "none")])
def test_offload(snapshots, tmp_path, monkeypatch, flags, mode):
    """--offload (and its older spelling --offload-text-encoder) is the mode the pipeline places its components by; auto on
    the CPU is none."""
    modes = []
    init = Offload.__init__
    monkeypatch.setattr(Offload, "__init__", lambda self, mode, *args, **kwargs: modes.append(mode) or init(self, mode, *args, **kwargs))
    generate(snapshots, tmp_path, "z-image-turbo", *flags)
    assert modes == [mode]


@pytest.mark.parametrize("snapshot, flags, rows", [("z-image-turbo", [], 1), ("z-image", [], 2), ("z-image", ["--guidance", "0"], 1),
                                                   ("flux-dev", [], 1), ("flux-dev", ["--true-cfg", "2"], 2)])
def test_the_memory_estimate_counts_the_cfg_rows(snapshots, tmp_path, monkeypatch, snapshot, flags, rows):
    """The estimate's activations are per CFG row: Z-Image base's default guidance and FLUX.1's true CFG run two per call."""
    footprints = []
    check = cli.check_memory
    monkeypatch.setattr(cli, "check_memory", lambda *args, **kwargs: footprints.append(check(*args, **kwargs)[0]) or check(*args, **kwargs))
    generate(snapshots, tmp_path, snapshot, *flags)
    assert [f.rows for f in footprints] == [rows]


@pytest.mark.parametrize("environment, flags, reference", [
    (None, [], False),
    (None, ["--backend", "reference"], True),
    ("reference", [], True),
    ("reference", ["--backend", "sdpa"], False),  # the flag wins over the environment
])
def test_backend_and_environment(snapshots, tmp_path, monkeypatch, environment, flags, reference):
    """--backend and ZFLUX_BACKEND choose the attention the transformer runs (`reference`: the explicit fp32 math)."""
    if environment is None:
        monkeypatch.delenv("ZFLUX_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ZFLUX_BACKEND", environment)
    calls = []
    math = attention.reference_attention
    monkeypatch.setattr(attention, "reference_attention", lambda *args: calls.append(1) or math(*args))
    generate(snapshots, tmp_path, "z-image-turbo", *flags)
    assert bool(calls) == reference


def test_bad_environment_backend_is_named(snapshots, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZFLUX_BACKEND", "fast")
    with pytest.raises(SystemExit) as exit_info:
        generate(snapshots, tmp_path, "z-image-turbo")
    assert "unknown backend 'fast'; choose one of auto, sdpa, triton, reference" in str(exit_info.value.code)
