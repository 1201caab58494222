"""The `zflux` command: generate (snapshot folders and single files; the small model zflux ships), info (checkpoint
identification from headers), convert (layout round trips), train (each flag reaching the run), and the named errors.
Runs `main([...])` in-process on tiny random snapshots (tiny_pipelines.py), on the CPU in fp32."""

import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

import zflux.cli as cli
import zflux.common.training as training
from zflux.cli import main
from zflux.common.identify import identify, read_header
from zflux.common.vae import from_diffusers as vae_from_diffusers
from zflux.common.weights import COMFY_PREFIX, read_state_dict, save_state_dict
from zflux.flux.convert import from_diffusers as flux_from_diffusers
from zflux.flux.model import Flux, FluxConfig
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from zflux.zimg.convert import from_diffusers as zimage_from_diffusers

CPU = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {"z-image-turbo": zimage_snapshot(root / "turbo"), "flux-dev": flux_snapshot(root / "dev", "flux-dev"),
            "flux-schnell": flux_snapshot(root / "schnell", "flux-schnell")}


@pytest.fixture(scope="module")
def bfl_folder(snapshots, tmp_path_factory):
    """What BFL's FLUX.1-dev repository holds: flux1-dev.safetensors and ae.safetensors beside the text-encoder folders."""
    root, snapshot = tmp_path_factory.mktemp("FLUX.1-dev"), snapshots["flux-dev"]
    save_state_dict(flux_from_diffusers(read_state_dict(snapshot / "transformer")), root / "flux1-dev.safetensors")
    save_state_dict(vae_from_diffusers(read_state_dict(snapshot / "vae")), root / "ae.safetensors")
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (root / name).symlink_to(snapshot / name)
    # tiny files need their configs (real single files load at the full-size presets)
    configs = root / "configs"
    for name, file in (("transformer", "flux1-dev.safetensors"), ("vae", "ae.safetensors")):
        (configs / name).mkdir(parents=True)
        shutil.copy(snapshot / name / "config.json", configs / name)
        (configs / name / file).symlink_to(root / file)
    return root


def run(*argv: str) -> None:
    main([str(a) for a in argv])


def fails(capsys, *argv: str) -> str:
    """Run zflux expecting a clean error exit; return its message."""
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code) + capsys.readouterr().err


def test_generate_from_snapshot(snapshots, tmp_path, capsys):
    out = tmp_path / "images" / "cat.png"
    run("generate", "--model", "z-image-turbo", "--weights", snapshots["z-image-turbo"], "--prompt", "a photo of a cat",
        "--height", 48, "--width", 64, "--steps", 2, "--seed", 3, "--out", out, *CPU)
    report = capsys.readouterr()
    assert f"{out}: 64x48, z-image-turbo, seed 3; generated in" in report.out
    assert "z-image-turbo: 100%" in report.err and "2/2" in report.err  # the tqdm bar over steps
    with Image.open(out) as image:
        assert image.size == (64, 48) and image.mode == "RGB"


def test_generate_image_to_image(snapshots, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (70, 40), (200, 30, 30)).save(init)
    run("generate", "--model", "flux-schnell", "--weights", snapshots["flux-schnell"], "--prompt", "a red square",
        "--init-image", init, "--strength", 0.5, "--steps", 4, "--out", tmp_path / "out.png", *CPU)
    assert "64x32, flux-schnell" in capsys.readouterr().out
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 32)


def test_generate_from_single_file(bfl_folder, tmp_path, capsys):
    """A transformer file finds ae.safetensors and the text encoders beside it, or takes them from flags."""
    configs = bfl_folder / "configs"
    run("generate", "--model", "flux-dev", "--weights", configs / "transformer" / "flux1-dev.safetensors",
        "--vae", configs / "vae" / "ae.safetensors", "--text-encoders", bfl_folder, "--prompt", "a cat",
        "--height", 32, "--width", 32, "--steps", 2, "--guidance", 4.0, "--out", tmp_path / "a.png", *CPU)
    assert "32x32, flux-dev" in capsys.readouterr().out

    message = fails(capsys, "generate", "--model", "flux-dev", "--weights", configs / "transformer" / "flux1-dev.safetensors",
                    "--prompt", "a cat", "--out", tmp_path / "b.png", *CPU)
    assert "no autoencoder at" in message and "pass --vae" in message
    message = fails(capsys, "generate", "--model", "flux-dev", "--weights", configs / "transformer" / "flux1-dev.safetensors",
                    "--vae", bfl_folder / "ae.safetensors", "--prompt", "a cat", "--out", tmp_path / "b.png", *CPU)
    assert "lacks the text-encoder subfolder(s) text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/" in message


@pytest.mark.parametrize("args, message", [
    (["--height", "1000"], "height 1000 is not a multiple of 16"),
    (["--width", "100"], "width 100 is not a multiple of 16"),
    (["--prompt", ""], "the prompt is empty"),
    (["--out", "image"], "has no file extension"),
    (["--init-image", "missing.png"], "no image file at missing.png"),
])
def test_request_errors_come_before_loading(snapshots, tmp_path, capsys, args, message):
    defaults = {"--prompt": "a cat", "--out": str(tmp_path / "x.png")}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value
    argv = ["generate", "--model", "z-image-turbo", "--weights", tmp_path / "no-weights-needed", *CPU]
    assert message in fails(capsys, *argv, *[x for kv in defaults.items() for x in kv])


def test_weights_errors(snapshots, bfl_folder, tmp_path, capsys):
    gen = lambda model, weights, *more: fails(capsys, "generate", "--model", model, "--weights", weights, "--prompt", "a cat",
                                              "--out", tmp_path / "x.png", *more, *CPU)
    assert "is a ZImagePipeline snapshot, not FluxPipeline" in gen("flux-dev", snapshots["z-image-turbo"])
    assert "is a FluxPipeline snapshot, not ZImagePipeline" in gen("z-image-turbo", snapshots["flux-dev"])
    assert "holds FLUX.1 dev (guidance-distilled; Kontext has the same shapes and nothing here names it Kontext), not Z-Image" in gen(
        "z-image-turbo", bfl_folder / "flux1-dev.safetensors")
    assert "holds FLUX.1 dev (guidance-distilled; Kontext has the same shapes and nothing here names it Kontext), not flux-schnell" in gen(
        "flux-schnell", snapshots["flux-dev"])
    assert "holds the 16-channel FLUX.1 / Z-Image autoencoder, not FLUX.1" in gen("flux-dev", bfl_folder / "ae.safetensors")
    assert "no weights at" in gen("flux-dev", tmp_path / "missing.safetensors")
    assert "--vae and --text-encoders go with a transformer file" in gen("flux-dev", snapshots["flux-dev"], "--vae", "ae.safetensors")

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(snapshots["z-image-turbo"] / "model_index.json", partial)
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        (partial / name).symlink_to(snapshots["z-image-turbo"] / name)
    assert "lacks the subfolder(s) tokenizer/" in gen("z-image-turbo", partial)
    assert "has no model_index.json" in gen("z-image-turbo", snapshots["z-image-turbo"] / "vae")


def test_info_snapshot(snapshots, capsys):
    run("info", snapshots["z-image-turbo"])
    out = capsys.readouterr().out
    assert "a diffusers ZImagePipeline snapshot" in out
    assert "scheduler/: static shift 3.0: z-image-turbo's schedule" in out
    assert "a Z-Image transformer (Turbo or base: they share every shape)" in out and "Qwen3" in out
    params = sum(t.numel() for t in read_state_dict(snapshots["z-image-turbo"] / "transformer").values())
    assert f"parameters: {params:,}" in out

    run("info", snapshots["flux-dev"])
    out = capsys.readouterr().out
    for what in ("FLUX.1 dev", "flux-dev or flux-fill or flux-canny or flux-depth or flux-kontext or flux-redux's schedule",
                 "a CLIP text encoder", "a T5 text encoder", "16-channel"):
        assert what in out
    run("info", snapshots["flux-schnell"])
    assert "scheduler/: static shift 1.0: flux-schnell's schedule" in capsys.readouterr().out


def test_info_file(bfl_folder, tmp_path, capsys):
    state_dict = read_state_dict(bfl_folder / "flux1-dev.safetensors")
    mixed = {k: v.to(torch.bfloat16) if k.startswith("single") else v for k, v in state_dict.items()}
    save_state_dict(mixed, tmp_path / "mixed.safetensors")
    run("info", tmp_path / "mixed.safetensors")
    out = capsys.readouterr().out
    bf16 = sum(v.numel() for k, v in state_dict.items() if k.startswith("single")) / sum(v.numel() for v in state_dict.values())
    assert "layout:     official" in out and f"bf16 ({bf16:.1%})" in out and "fp32 (" in out


def tiny_flux(tmp_path, name: str, **cfg) -> str:
    """Save a tiny random FLUX.1 transformer (BFL layout) with the given config changes; return its path."""
    config = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), **cfg)
    path = tmp_path / f"{name}.safetensors"
    save_state_dict(Flux(config).state_dict(), path)
    return path


def test_identify_variants_and_layouts(snapshots, bfl_folder, tmp_path):
    """Family, variant and layout from names and shapes alone."""
    cases = {
        tiny_flux(tmp_path, "schnell"): ("flux.1", "flux-schnell", "official"),
        tiny_flux(tmp_path, "dev", guidance_embeds=True): ("flux.1", "flux-dev", "official"),
        tiny_flux(tmp_path, "fill", in_channels=384, out_channels=64, guidance_embeds=True): ("flux.1", "flux-fill", "official"),
        tiny_flux(tmp_path, "control", in_channels=128, out_channels=64, guidance_embeds=True): ("flux.1", "flux-canny-or-depth", "official"),
        snapshots["flux-schnell"] / "transformer": ("flux.1", "flux-schnell", "diffusers"),
        bfl_folder / "ae.safetensors": ("autoencoder", "flux-vae", "official"),
        snapshots["flux-dev"] / "vae": ("autoencoder", "flux-vae", "diffusers"),
        snapshots["z-image-turbo"] / "transformer": ("z-image", None, "diffusers"),
        snapshots["flux-dev"] / "text_encoder_2": ("t5", None, "transformers"),
        snapshots["flux-dev"] / "text_encoder": ("clip", None, "transformers"),
        snapshots["z-image-turbo"] / "text_encoder": ("qwen3", None, "transformers"),
    }
    official = zimage_from_diffusers(read_state_dict(snapshots["z-image-turbo"] / "transformer"))
    save_state_dict(official, tmp_path / "z_image.safetensors")
    save_state_dict({COMFY_PREFIX + k: v for k, v in official.items()}, tmp_path / "z_image_comfy.safetensors")
    save_state_dict({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    cases |= {tmp_path / "z_image.safetensors": ("z-image", None, "official"),
              tmp_path / "z_image_comfy.safetensors": ("z-image", None, "ComfyUI"),
              tmp_path / "other.safetensors": ("unknown", None, "unknown")}
    for path, expected in cases.items():
        info = identify(path)
        assert (info.family, info.variant, info.layout) == expected, path
    assert identify(tmp_path / "z_image.safetensors").params == sum(v.numel() for v in official.values())


def test_identify_reads_no_tensor(tmp_path, monkeypatch):
    """Only the header: reading a tensor would fail here."""
    path = tiny_flux(tmp_path, "dev", guidance_embeds=True)
    from safetensors import safe_open
    handle = safe_open(str(path), framework="pt")
    monkeypatch.setattr(type(handle), "get_tensor", lambda *a: pytest.fail("identify read a tensor"))
    assert read_header(path)["img_in.weight"] == ("F32", (32, 64))
    assert identify(path).variant == "flux-dev"


@pytest.mark.parametrize("source", ["z-image-turbo/transformer", "flux-dev/transformer", "flux-dev/vae"])
def test_convert_round_trip(snapshots, tmp_path, capsys, source):
    """diffusers -> original -> diffusers gives back every tensor exactly."""
    variant, folder = source.split("/")
    src = snapshots[variant] / folder
    run("convert", src, tmp_path / "original.safetensors")
    assert "original layout (read as diffusers)" in capsys.readouterr().out
    assert identify(tmp_path / "original.safetensors").layout == "official"
    run("convert", tmp_path / "original.safetensors", tmp_path / "back.safetensors", "--to", "diffusers")
    expected, got = read_state_dict(src), read_state_dict(tmp_path / "back.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_convert_errors(snapshots, tmp_path, capsys):
    assert "must be a .safetensors file" in fails(capsys, "convert", snapshots["flux-dev"] / "transformer", tmp_path / "out.bin")
    assert "zflux convert handles Z-Image, FLUX.1, FLUX.2 and their autoencoder" in fails(
        capsys, "convert", snapshots["flux-dev"] / "text_encoder_2", tmp_path / "t5.safetensors")
    assert "no checkpoint at" in fails(capsys, "convert", tmp_path / "missing", tmp_path / "out.safetensors")


def test_console_script(snapshots):
    """`zflux` is installed as zflux.cli:main and runs as a program: the script pip installed beside this interpreter, run
    by it (whether or not its folder is on PATH, and whatever interpreter its first line names in a copied environment)."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "zflux"]
    assert script.value == "zflux.cli:main"
    program = Path(sysconfig.get_path("scripts")) / "zflux"
    assert program.is_file(), f"no console script at {program}: install zflux with pip install -e ."
    done = subprocess.run([sys.executable, program, "info", str(snapshots["flux-dev"] / "transformer")], capture_output=True, text=True)
    assert done.returncode == 0 and "FLUX.1 dev" in done.stdout
    with pytest.raises(SystemExit) as exit_info:  # in-process: one interpreter start (seconds) is enough
        main(["generate", "--model", "flux-dev"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`zflux train` at 32 pixels for a step or two: the autoencoder, then the small Z-Image (its grid cut to one picture)."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:1])
        run("train", "autoencoder", "--out", out, "--size", 32, "--max-steps", 2, "--batch-size", 2, "--device", "cpu")
        run("train", "z-image-turbo", "--out", out, "--size", 32, "--max-steps", 1, "--batch-size", 2, "--device", "cpu")
    return out


def test_train(runs, capsys):
    """Each run leaves its folder; a second call resumes the run (here: already at --max-steps, so it only saves)."""
    assert (runs / "autoencoder" / "model" / "config.json").is_file()
    assert {"model", "grid.png", "loss.png", "state.safetensors"} <= {p.name for p in (runs / "z-image-turbo").iterdir()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "SHOWCASE", training.SHOWCASE[:1])
        run("train", "z-image-turbo", "--out", runs, "--size", 32, "--max-steps", 1, "--device", "cpu")
    assert f"{runs / 'z-image-turbo' / 'model'}: z-image-turbo (diffusers folder)" in capsys.readouterr().out


def test_train_needs_the_autoencoder(tmp_path, capsys):
    message = fails(capsys, "train", "flux-dev", "--out", tmp_path, "--device", "cpu")
    assert "no trained autoencoder at" in message and "zflux train autoencoder" in message


def test_generate_runs_the_small_model_without_weights(runs, tmp_path, capsys, monkeypatch):
    """No --model and no --weights: the small Z-Image zflux ships, at its size, and the command says so."""
    monkeypatch.setitem(cli.EMBEDDED, "z-image-turbo", (runs / "z-image-turbo" / "model", 32))
    run("generate", "--prompt", "a red circle on a blue background", "--out", tmp_path / "circle.png", "--device", "cpu")
    out = capsys.readouterr().out
    assert "model: zflux's small z-image-turbo-shaped model, trained on 32x32 pictures" in out and "32x32, z-image-turbo" in out


def test_small_model_errors(tmp_path, capsys, monkeypatch):
    assert "--model z-image needs --weights" in fails(capsys, "generate", "--model", "z-image", "--prompt", "a cat", "--out", "a.png")
    monkeypatch.setitem(cli.EMBEDDED, "flux-dev", (tmp_path / "nothing", 128))
    message = fails(capsys, "generate", "--model", "flux-dev", "--prompt", "a cat", "--out", "a.png")
    assert "zflux's small flux-dev is not in this installation" in message and "zflux train flux-dev" in message


def test_train_flags_reach_the_run(tmp_path, capsys, monkeypatch):
    """Every flag of `zflux train` reaches the run: its settings over the run's defaults, the folders, size, device, workers."""
    calls = []
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    record = lambda folder, vae, settings, **options: calls.append((folder, vae, settings, options)) or folder / "model"
    defaults = cli.TRAIN["z-image-turbo"][1]
    monkeypatch.setitem(cli.TRAIN, "z-image-turbo", (record, defaults))
    run("train", "z-image-turbo", "--out", tmp_path / "runs", "--minutes", 3, "--max-steps", 5, "--batch-size", 8, "--lr", 2e-4,
        "--size", 64, "--vae", vae, "--init", tmp_path / "shipped", "--device", "cpu", "--workers", 3, "--seed", 2)
    ((folder, given_vae, settings, options),) = calls
    assert folder == tmp_path / "runs" / "z-image-turbo" and given_vae == vae
    assert settings == replace(defaults, minutes=3.0, max_steps=5, batch_size=8, lr=2e-4, seed=2)
    assert options == dict(size=64, device=torch.device("cpu"), workers=3, init=tmp_path / "shipped")
    assert "--init and --vae go with a transformer's run" in fails(capsys, "train", "autoencoder", "--init", tmp_path, "--out", tmp_path)
