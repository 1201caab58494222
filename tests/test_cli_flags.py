"""Every flag of `zflux generate`, and ZFLUX_BACKEND, does what it says: each test fails if the flag were ignored.

A flag that changes the image is run through the command and compared, pixel for pixel, with the
Python API given the setting it stands for; that image must differ from the one the API makes
without the setting, so the comparison would see the flag dropped. Flags that leave the image
alone (--device, --offload-text-encoder, --backend) are checked by what they change instead.
--model, --weights, --vae, --text-encoders, --prompt, --height, --width and --out: test_cli.py.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from zflux.cli import main
from zflux.common import attention
from zflux.flux.pipeline import FluxPipeline
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from zflux.zimg import pipeline as zimage_pipeline
from zflux.zimg.pipeline import ZImagePipeline
from zflux.zimg.text import Qwen3PromptEncoder

PROMPT = "a photo of a cat"
SIZE = dict(height=32, width=32)
FP32 = dict(device="cpu", dtype=torch.float32)
PIPELINES = {"z-image-turbo": ZImagePipeline, "z-image": ZImagePipeline, "flux-dev": FluxPipeline}

CASES = [  # (variant, the flags, what generate() gets for them, what it would get were the flag under test ignored)
    ("z-image-turbo", ["--seed", "5"], dict(seed=5), dict()),
    ("z-image-turbo", ["--steps", "3"], dict(steps=3), dict(steps=2)),
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
]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {variant: (zimage_snapshot if variant.startswith("z") else flux_snapshot)(root / variant, variant) for variant in PIPELINES}


@pytest.fixture(scope="module")
def pipelines(snapshots):
    return {variant: cls.from_pretrained(snapshots[variant], **FP32) for variant, cls in PIPELINES.items()}


@pytest.fixture(scope="module")
def init_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def generate(snapshots, tmp_path, variant: str, *flags: str) -> np.ndarray:
    """The pixels `zflux generate` writes for `variant` with `flags` (32 x 32, 2 steps unless the flags say otherwise)."""
    out = tmp_path / "out.png"
    steps = [] if "--steps" in flags else ["--steps", "2"]
    main(["generate", "--model", variant, "--weights", str(snapshots[variant]), "--prompt", PROMPT, "--height", "32", "--width", "32",
          *steps, "--out", str(out), "--device", "cpu", "--dtype", "fp32", *flags])
    with Image.open(out) as image:
        return np.asarray(image)


def api(pipe, **settings) -> np.ndarray:
    return np.asarray(pipe.generate(PROMPT, **(dict(steps=2) | SIZE | settings), progress=False))


@pytest.mark.parametrize("variant, flags, settings, ignored", CASES, ids=[" ".join(c[1]).replace("{init} ", "") for c in CASES])
def test_flag_reaches_generate(snapshots, pipelines, init_image, tmp_path, variant, flags, settings, ignored):
    fill = lambda d: {k: v.format(init=init_image) if isinstance(v, str) else v for k, v in d.items()}
    image = generate(snapshots, tmp_path, variant, *(f.format(init=init_image) for f in flags))
    expected = api(pipelines[variant], **fill(settings))
    assert np.array_equal(image, expected)
    assert not np.array_equal(expected, api(pipelines[variant], **fill(ignored)))


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


def test_offload_text_encoder(snapshots, tmp_path, monkeypatch):
    """--offload-text-encoder moves the text encoder to the device for the prompt and back to the CPU after."""
    moves = []
    move = Qwen3PromptEncoder.to
    monkeypatch.setattr(Qwen3PromptEncoder, "to", lambda self, device: moves.append(str(device)) or move(self, device))
    generate(snapshots, tmp_path, "z-image-turbo")
    assert moves == []
    generate(snapshots, tmp_path, "z-image-turbo", "--offload-text-encoder")
    assert moves == ["cpu", "cpu"]  # to the device (the CPU here), then back


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
