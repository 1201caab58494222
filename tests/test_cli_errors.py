"""Bad input to `zflux`: one clear line on stderr, a non-zero exit, no traceback, no output file, and no weight read.

BAD_INPUTS is the table: every case runs in-process through `main([...])` with the weight loaders
mocked to fail (reading a weight would be a test failure, not an error line); a handful also run
through the real command in subprocesses (`python -m zflux.cli`, as torchrun users run it), all at
once. The runtime guards (NaN latents, out of memory, Ctrl-C), what image CLIs are expected to do
(random seeds, numbered files, settings in the PNG) and the refusal of pickles follow.
"""

import ast
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from zflux import __version__
from zflux.cli import main
from zflux.common.files import atomic_write
from zflux.common.pipeline import DivergedError, denoise
from zflux.common.weights import COMFY_PREFIX, CheckpointError, check_header, read_state_dict, save_state_dict
from zflux.flux.convert import from_diffusers as flux_from_diffusers
from zflux.zimg.convert import check_transformer as check_zimage
from zflux.zimg.convert import from_diffusers as zimage_from_diffusers
from zflux.zimg.model import ZImageConfig, ZImageTransformer
from tiny_pipelines import ZIMAGE, flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
GENERATE = {"--model": "z-image-turbo", "--weights": "{z}", "--prompt": "cat", "--out": "{tmp}/out/x.png", "--height": "32",
            "--width": "32", "--device": "cpu", "--dtype": "fp32"}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def edited(snapshot: Path, dst: Path, drop: str) -> Path:
    """A copy of `snapshot` (other folders linked) whose transformer lacks the tensor `drop`."""
    dst.mkdir()
    for item in snapshot.iterdir():
        if item.name != "transformer":
            (dst / item.name).symlink_to(item)
    (dst / "transformer").mkdir()
    shutil.copy(snapshot / "transformer" / "config.json", dst / "transformer")
    state_dict = read_state_dict(snapshot / "transformer")
    del state_dict[drop]
    save_state_dict(state_dict, dst / "transformer" / "diffusion_pytorch_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Tiny snapshots, broken copies of them, a bare transformer file, pickles and images, by name."""
    root = tmp_path_factory.mktemp("weights")
    z, dev = zimage_snapshot(root / "z"), flux_snapshot(root / "dev", "flux-dev")
    single = root / "single"  # a bare tiny Z-Image file: without a config.json it is taken for the full-size model
    single.mkdir()
    save_state_dict(zimage_from_diffusers(read_state_dict(z / "transformer")), single / "z_image.safetensors")
    shutil.copy(next((z / "vae").glob("*.safetensors")), single / "ae.safetensors")
    for name in ("text_encoder", "tokenizer"):
        (single / name).symlink_to(z / name)
    pickled = root / "pickled_text"  # a snapshot whose text encoder is a pytorch_model.bin
    shutil.copytree(z, pickled, ignore=shutil.ignore_patterns("*.safetensors*"), dirs_exist_ok=False)
    for name in ("transformer", "vae"):
        shutil.rmtree(pickled / name)
        (pickled / name).symlink_to(z / name)
    (pickled / "text_encoder" / "pytorch_model.bin").write_bytes(b"never unpickled")
    (root / "model.bin").write_bytes(b"never unpickled")
    Image.new("RGB", (48, 32), (200, 30, 30)).save(root / "init.png")
    Image.new("L", (16, 16), 255).save(root / "small.png")
    (root / "not_an_image.png").write_text("text")
    (root / "empty.txt").write_text("\n  \n")
    (root / "folder.png").mkdir()
    return {"z": z, "dev": dev, "single": single, "pickled_text": pickled, "root": root,
            "z_no_to_k": edited(z, root / "z_no_to_k", drop="layers.1.attention.to_k.weight"),
            "z_no_norm_k": edited(z, root / "z_no_norm_k", drop="layers.1.attention.norm_k.weight"),
            "dev_no_norm_out": edited(dev, root / "dev_no_norm_out", drop="norm_out.linear.bias")}


def generate_argv(**flags: str | None) -> list[str]:
    """`zflux generate` with GENERATE's flags, `flags` (--some-flag as some_flag; None drops one) in their place."""
    given = GENERATE | {"--" + name.replace("_", "-"): value for name, value in flags.items()}
    argv = ["generate"]
    for name, value in given.items():
        argv += [] if value is None else [name] if value is True else [name, value]
    return argv


BAD_INPUTS = {  # id: (argv, what the one line says)
    "width-0": (generate_argv(width="0"), "width 0 must be positive"),
    "height-negative": (generate_argv(height="-64"), "height -64 must be positive"),
    "height-not-multiple": (generate_argv(height="1000"), "height 1000 is not a multiple of 16"),
    "width-not-multiple": (generate_argv(width="100"), "width 100 is not a multiple of 16"),
    "size-past-positions": (generate_argv(height="16384"), "height 16384 is past Z-Image's position table: at most 8192"),
    "steps-0": (generate_argv(steps="0"), "steps must be at least 1, got 0"),
    "steps-negative": (generate_argv(steps="-1"), "steps must be at least 1, got -1"),
    "strength-above-1": (generate_argv(init_image="{root}/init.png", strength="1.5"), "strength must be in [0, 1], got 1.5"),
    "strength-no-step": (generate_argv(init_image="{root}/init.png", strength="0"), "leaves no denoising step"),
    "strength-without-init": (generate_argv(strength="0.5"), "--strength goes with --init-image"),
    "out-txt": (generate_argv(out="{tmp}/x.txt"), "Pillow writes no RGB .txt file"),
    "out-no-suffix": (generate_argv(out="{tmp}/image"), "has no file extension"),
    "out-is-folder": (generate_argv(out="{root}/folder.png"), "is a folder"),
    "out-under-a-file": (generate_argv(out="{root}/init.png/x.png"), "is a file, not a folder"),
    "init-image-missing": (generate_argv(init_image="{tmp}/missing.png"), "no image file at"),
    "init-image-unreadable": (generate_argv(init_image="{root}/not_an_image.png"), "as an image"),
    "prompt-empty": (generate_argv(prompt=""), "the prompt is empty"),
    "prompts-missing": (generate_argv(prompt=None, prompts="{tmp}/missing.txt"), "cannot read --prompts"),
    "prompts-empty": (generate_argv(prompt=None, prompts="{root}/empty.txt"), "holds no prompt"),
    "seed-negative": (generate_argv(seed="-5"), "--seed -5: use 0 to"),
    "num-images-0": (generate_argv(num_images="0"), "--num-images 0: make at least 1"),
    "guidance-nan": (generate_argv(guidance="nan"), "--guidance nan: give a finite number"),
    "guidance-negative": (generate_argv(guidance="-1"), "the guidance scale is >= 0"),
    "negative-prompt-without-cfg": (generate_argv(negative_prompt="blurry"), "a negative prompt needs classifier-free guidance"),
    "true-cfg-with-z-image": (generate_argv(true_cfg="2"), "--true-cfg is a FLUX.1 option"),
    "cfg-truncation-with-flux": (generate_argv(model="flux-dev", weights="{dev}", cfg_truncation="0.5"),
                                 "--cfg-truncation is a Z-Image option"),
    "guidance-with-schnell": (generate_argv(model="flux-schnell", weights="{dev}", guidance="2"), "flux-schnell has no guidance input"),
    "negative-prompt-without-true-cfg": (generate_argv(model="flux-dev", weights="{dev}", negative_prompt="blurry"),
                                         "only with true CFG"),
    "mask-without-init-flux1": (generate_argv(model="flux-dev", weights="{dev}", mask="{root}/init.png"),
                                "a mask needs the image it masks"),
    "mask-with-kontext": (generate_argv(model="flux-kontext", weights="{dev}", init_image="{root}/init.png", mask="{root}/init.png"),
                          "flux-kontext takes no mask"),
    "mask-size-flux1": (generate_argv(model="flux-dev", weights="{dev}", init_image="{root}/init.png", mask="{root}/small.png"),
                        "the mask is 16x16 but the image is 48x32"),
    "outpaint-with-dev": (generate_argv(model="flux-dev", weights="{dev}", init_image="{root}/init.png", outpaint="0,0,16,0"),
                          "outpainting needs FLUX.1 Fill"),
    "reference-image-without-redux": (generate_argv(model="flux-dev", weights="{dev}", reference_image="{root}/init.png"),
                                      "flux-dev takes reference images through FLUX.1 Redux"),
    "redux-without-folder": (generate_argv(model="flux-redux", weights="{dev}", reference_image="{root}/init.png"),
                             "--model flux-redux needs --redux FOLDER"),
    "redux-with-true-cfg": (generate_argv(model="flux-redux", weights="{dev}", redux="{root}", reference_image="{root}/init.png",
                                          true_cfg="2"), "FLUX.1 Redux (--reference-image) runs without true CFG"),
    "canny-without-control-image": (generate_argv(model="flux-canny", weights="{dev}"), "flux-canny needs a control image"),
    "control-image-with-flux2": (generate_argv(model="flux2-dev", weights="{dev}", control_image="{root}/init.png"),
                                 "--control-image does not apply to FLUX.2"),
    "true-cfg-below-1": (generate_argv(model="flux-dev", weights="{dev}", true_cfg="0.5"), "--true-cfg 0.5: the true CFG scale is >= 1"),
    "device-gpu0": (generate_argv(device="gpu0"), "device 'gpu0' is not a device"),
    "device-cuda": (generate_argv(device="cuda"), "device 'cuda': this PyTorch"),
    "backend-triton": (generate_argv(backend="triton"), "--backend triton: the Triton kernels run on a CUDA GPU"),
    "dtype-unknown": (generate_argv(dtype="fp8"), "argument --dtype: invalid choice"),
    "out-missing": (generate_argv(out=None), "the following arguments are required: --out"),
    "z-image-without-k": (generate_argv(weights="{z_no_to_k}"), "does not fit ZImageTransformer; missing keys (1): "
                                                                 "layers.1.attention.to_k.weight"),
    "z-image-without-norm-k": (generate_argv(weights="{z_no_norm_k}"), "missing keys (1): layers.1.attention.norm_k.weight"),
    "flux-without-norm-out": (generate_argv(model="flux-dev", weights="{dev_no_norm_out}"), "missing keys (1): norm_out.linear.bias"),
    "tiny-file-for-full-model": (generate_argv(weights="{single}/z_image.safetensors"),
                                 "(6.15 B) parameters): it holds a Z-Image transformer"),
    "pickled-transformer": (generate_argv(weights="{root}/model.bin"), "is a pickled checkpoint (model.bin); zflux reads only"),
    "pickled-text-encoder": (generate_argv(weights="{pickled_text}"), "is a pickled checkpoint (pytorch_model.bin)"),
    "z-image-snapshot-for-flux": (generate_argv(model="flux-dev"), "is a ZImagePipeline snapshot, not FluxPipeline"),
    "flux-snapshot-for-z-image": (generate_argv(weights="{dev}"), "is a FluxPipeline snapshot, not ZImagePipeline"),
    "dev-for-schnell": (generate_argv(model="flux-schnell", weights="{dev}"), "holds FLUX.1 dev"),
    "component-folder": (generate_argv(weights="{dev}/vae"), "has no model_index.json"),
    "weights-missing": (generate_argv(weights="{tmp}/missing.safetensors"), "no weights at"),
    "vae-with-snapshot": (generate_argv(weights="{dev}", vae="ae.safetensors"), "--vae and --text-encoders go with a transformer file"),
    "file-without-text-encoders": (generate_argv(model="flux-dev", weights="{single}/z_image.safetensors"),
                                   "lacks the text-encoder subfolder(s) text_encoder_2/, tokenizer_2/"),
    "convert-without-k": (["convert", "{z_no_to_k}/transformer", "{tmp}/o.safetensors"],
                          "lacks layers.1.attention.to_k.weight: layers.1.attention.qkv.weight fuses"),
    "convert-to-bin": (["convert", "{dev}/transformer", "{tmp}/o.bin"], "must be a .safetensors file"),
    "convert-text-encoder": (["convert", "{dev}/text_encoder_2", "{tmp}/o.safetensors"], "zflux convert handles"),
    "convert-missing": (["convert", "{tmp}/missing", "{tmp}/o.safetensors"], "no checkpoint at"),
    "convert-pickle": (["convert", "{root}/model.bin", "{tmp}/o.safetensors"], "convert it once in a trusted environment"),
    "info-pickle": (["info", "{root}/model.bin"], "is a pickled checkpoint"),
    "info-missing": (["info", "{tmp}/missing"], "no checkpoint at"),
}
NEEDS_NO_CUDA = {"device-cuda", "backend-triton"}
SUBPROCESS = ("width-0", "device-gpu0", "z-image-without-k", "convert-without-k")


def fill(argv: list[str], paths: dict[str, Path], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **paths) for a in argv]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def assert_one_clean_line(code, err: str, message: str, after_progress: bool = False) -> None:
    """A failed exit whose stderr is one line naming the problem (`after_progress`: the last line, after progress bars)."""
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert after_progress or len(lines) == 1, err
    assert message in lines[-1], err


def exit_of(done: pytest.ExceptionInfo, capsys) -> tuple[int, str]:
    """(exit status, stderr) of main() run in-process: sys.exit("message") is status 1, the message on stderr."""
    code, err = done.value.code, capsys.readouterr().err
    return (1, err + code + "\n") if isinstance(code, str) else (code, err)


@pytest.fixture
def no_weight_read(monkeypatch):
    """Reading a weight fails the test: every check must come first."""
    def read(*args, **kwargs):
        raise AssertionError("a weight was read before the request was refused")

    monkeypatch.setattr("zflux.common.weights.read_state_dict", read)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(read))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton runs on the CPU only under its interpreter


@pytest.mark.parametrize("argv, message", [pytest.param(*case, id=key, marks=[NO_CUDA] if key in NEEDS_NO_CUDA else [])
                                           for key, case in BAD_INPUTS.items()])
def test_bad_input_is_one_line_before_any_weight(paths, tmp_path, capsys, no_weight_read, argv, message):
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(fill(argv, paths, tmp_path))
    assert_one_clean_line(*exit_of(done, capsys), message)
    assert files_under(tmp_path) == before


def test_bad_input_through_the_command(paths, tmp_path):
    """The same lines from the real program: `python -m zflux.cli ...` (what the console script runs), several at once."""
    env = os.environ | {"TRITON_INTERPRET": ""}
    runs = {key: subprocess.Popen([sys.executable, "-m", "zflux.cli", *fill(BAD_INPUTS[key][0], paths, tmp_path / key)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for key in SUBPROCESS}
    for key, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert_one_clean_line(run.returncode, err, BAD_INPUTS[key][1])
        assert not (tmp_path / key).exists() or not files_under(tmp_path / key)


def test_bare_command_help_and_version(capsys):
    main([])
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"zflux {__version__}\n"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    for words in ("8 steps, guidance 0.0", "--seed SEED", "a random one", "--dtype", "what the image should show"):
        assert words in help_text
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "(default: original)" in " ".join(capsys.readouterr().out.split())


IMPORTS_TORCH = "import sys\nfrom zflux.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"


def test_help_and_info_do_not_import_torch(paths):
    """What keeps `zflux --help` and `zflux info CHECKPOINT` fast: no torch (nor transformers) import, only headers."""
    for argv in (["--help"], ["info", str(paths["dev"] / "transformer")]):
        done = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip().endswith("False"), (argv, done.stdout, done.stderr)
    run = subprocess.run([sys.executable, "-m", "zflux.cli", "info", str(paths["z"] / "transformer")], capture_output=True, text=True)
    assert "parameters: 590,816 (0.59 M)" in run.stdout


def test_runs_write_numbered_images_with_their_settings(paths, tmp_path, capsys):
    """--prompts FILE x --num-images: numbered files, seeds s, s+1 per prompt, s random (--seed -1) and printed; the settings in each PNG,
    shown by `zflux info`; a prompt longer than the encoder reads is a warning naming the tokens dropped."""
    long_prompt = "a long prompt about a red fox " * 50  # byte-level tokens: one a letter, about 1,400, past Qwen3's 512
    (tmp_path / "prompts.txt").write_text(f"a red fox\n\n{long_prompt}\n")
    main(fill(generate_argv(prompt=None, prompts="{tmp}/prompts.txt", num_images="2", out="{tmp}/out/fox.png", steps="1", seed="-1"),
              paths, tmp_path))
    report = capsys.readouterr()
    lines = report.out.splitlines()
    seeds = [int(line.split("seed ")[1].split(";")[0]) for line in lines]
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / "out" / f"fox-{i}.png") for i in range(1, 5)]
    assert seeds[1] == seeds[0] + 1 and seeds[2:] == seeds[:2]
    assert report.err.count("zflux generate: warning: Qwen3 reads 512 tokens") == 1  # once: image 2 reuses the encoding
    assert "are dropped" in report.err
    mode = stat.S_IMODE((tmp_path / "out" / "fox-1.png").stat().st_mode)
    assert mode == 0o666 & ~current_umask()

    main(["info", str(tmp_path / "out" / "fox-2.png")])
    info = capsys.readouterr().out
    assert "PNG image, 32x32" in info and "a red fox" in info
    assert f"Steps: 1, Sampler: Euler, Guidance: 0.0, Seed: {seeds[1]}, Size: 32x32, Model: z-image-turbo, " in info
    assert f"Version: zflux {__version__}" in info


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_nan_latents_stop_the_run(paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("zflux.common.pipeline.euler_step", lambda x, v, sigma, sigma_next: x * float("nan"))
    with pytest.raises(SystemExit) as done:
        main(fill(generate_argv(steps="2", seed="1", out="{tmp}/x.png"), paths, tmp_path))
    assert_one_clean_line(*exit_of(done, capsys), after_progress=True,
                          message="the latents became NaN or infinite at step 1 of 2: try a more precise dtype")
    assert not files_under(tmp_path)


def test_denoise_names_the_first_bad_step_with_one_sync(monkeypatch):
    """The finiteness flags stay on the device until one read after the loop (a sync per step would stall the GPU)."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("denoise read a value per step"))
    sigmas = torch.linspace(1, 0, 6)
    velocity = lambda latents, i: torch.full_like(latents, float("inf") if i == 3 else 1.0)  # noqa: E731
    with pytest.raises(DivergedError, match="at step 4 of 5"):
        denoise(velocity, torch.zeros(1, 4, 2, 2), sigmas, start=1, progress=False)
    assert len(reads) == 1
    assert torch.isfinite(denoise(lambda latents, i: latents + 1, torch.zeros(1, 4, 2, 2), sigmas, 0, progress=False)).all()


def test_ctrl_c_while_saving_leaves_nothing(paths, tmp_path, capsys, monkeypatch):
    save = Image.Image.save

    def interrupted(image, fp, *args, **kwargs):
        if not isinstance(fp, (str, Path)):  # the format check's in-memory save
            return save(image, fp, *args, **kwargs)
        Path(fp).write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(SystemExit) as done:
        main(fill(generate_argv(steps="1", out="{tmp}/out/x.png"), paths, tmp_path))
    assert done.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert not files_under(tmp_path)


def test_atomic_write(tmp_path):
    """Whole or not at all, with a new file's usual permissions."""
    target = tmp_path / "sub" / "model.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not files_under(tmp_path)
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"whole")
    assert files_under(tmp_path) == {target} and target.read_bytes() == b"whole"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()


def test_converted_checkpoint_has_usual_permissions(paths, tmp_path, capsys):
    main(["convert", str(paths["z"] / "transformer"), str(tmp_path / "z.safetensors")])
    assert stat.S_IMODE((tmp_path / "z.safetensors").stat().st_mode) == 0o666 & ~current_umask()
    assert files_under(tmp_path) == {tmp_path / "z.safetensors"}


def test_out_of_memory_is_one_line_with_what_would_fit(paths, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("zflux.zimg.pipeline.ZImagePipeline.generate", oom)
    monkeypatch.setattr("zflux.common.memory.out_of_memory_need", lambda error, device: (10 * 2**30, 8 * 2**30))
    with pytest.raises(SystemExit) as done:
        main(fill(generate_argv(out="{tmp}/x.png"), paths, tmp_path))
    code, err = exit_of(done, capsys)
    assert_one_clean_line(code, err, "out of memory on cpu (8.0 GiB): the run needed more than 10.0 GiB; this would fit: ",
                          after_progress=True)
    assert "--dtype bf16 (about 5.0 GiB)" in err
    assert not files_under(tmp_path)


def test_clearly_short_memory_is_refused_before_loading(paths, tmp_path, capsys, monkeypatch, no_weight_read):
    monkeypatch.setattr("zflux.common.memory.free_bytes", lambda device: 2**20)
    with pytest.raises(SystemExit) as done:
        main(fill(generate_argv(height="1024", width="1024"), paths, tmp_path))
    assert_one_clean_line(*exit_of(done, capsys),
                          "cpu has 1.0 MiB free; z-image-turbo in fp32 at 1024x1024 needs at least 1.0 GiB; try a smaller")


def test_keys_are_named_in_the_files_own_layout(paths, tmp_path):
    """ComfyUI's prefix kept in the names; a tensor the converter drops (norm_final) is no error; a diffusers FLUX.1 file
    missing one part of a fused tensor names that part, in diffusers' names."""
    official = zimage_from_diffusers(read_state_dict(paths["z"] / "transformer"))
    cfg = ZImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ZIMAGE.items()})
    comfy = {COMFY_PREFIX + k: v for k, v in official.items() if k != "final_layer.linear.bias"} | {"norm_final.weight": torch.ones(2)}
    save_state_dict(comfy, tmp_path / "comfy.safetensors")
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {COMFY_PREFIX}final_layer.linear.bias$"):
        check_zimage(tmp_path / "comfy.safetensors", cfg=cfg)
    save_state_dict(official | {"norm_final.weight": torch.ones(2)}, tmp_path / "official.safetensors")
    check_header(ZImageTransformer(cfg), tmp_path / "official.safetensors", zimage_from_diffusers)

    flux = read_state_dict(paths["dev"] / "transformer")
    del flux["single_transformer_blocks.1.attn.to_v.weight"]
    with pytest.raises(CheckpointError, match="lacks single_transformer_blocks.1.attn.to_v.weight: single_blocks.1.linear1.weight fuses"):
        flux_from_diffusers(flux)


PICKLE_LOADERS = {"torch.load", "torch.serialization", "pickle", "cPickle", "dill", "joblib", "cloudpickle", "torch.jit.load"}


def test_no_code_path_loads_pickles():
    """No module of zflux imports a pickle loader or calls torch.load: checkpoints are safetensors only (the table above
    checks that .bin files, and text encoders saved as pytorch_model.bin, are refused with how to convert them)."""
    found = []
    for folder in ("zflux", "zimg", "flux", "common", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Attribute):
                    names = [ast.unparse(node)]
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n in PICKLE_LOADERS or n.split(".")[0] in PICKLE_LOADERS]
    assert found == []
