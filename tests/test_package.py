"""The installed package: one top-level name, `zflux`, living beside the PyPI packages its folders are named like."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import zflux

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("zflux", "zimg", "flux", "common", "kernels")


def zflux_modules() -> list[str]:
    """Every module of the installed zflux package."""
    return sorted(m.name for m in pkgutil.walk_packages(zflux.__path__, prefix="zflux."))


def test_hugging_face_kernels_beside_zflux():
    """Hugging Face's `kernels` (which transformers probes for) stays importable, and so do transformers'
    text encoders, diffusers and every zflux module, in one process."""
    kernels = importlib.import_module("kernels")
    assert hasattr(kernels, "get_kernel"), f"`import kernels` found {kernels.__file__}, not Hugging Face's package"
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    import diffusers  # noqa: F401

    for name in zflux_modules():
        importlib.import_module(name)
    ids = torch.tensor([[1, 2, 3]])
    Qwen3Model(Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8))(input_ids=ids)
    T5EncoderModel(T5Config(vocab_size=16, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))(input_ids=ids)
    CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8))(input_ids=ids)
    assert importlib.import_module("kernels") is kernels


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_holds_only_zflux(tmp_path):
    """A built wheel installs no top-level package but `zflux` (and the folders under it), and carries the small
    models' snapshot folders (stand-in files where the copy has none)."""
    source = tmp_path / "src"  # a copy: setuptools writes build/ into the tree it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    shipped = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    for family, name in ((f, n) for f in ("zimg", "flux") for n in shipped):
        path = source / family / "embedded" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                           str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("zflux-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"zflux"}
    for folder in FOLDERS[1:]:
        assert f"zflux/{folder}/__init__.py" in names
    assert {f"zflux/{family}/embedded/{name}" for family in ("zimg", "flux") for name in shipped} <= set(names)


def test_every_module_has_a_forward():
    """No nn.Module subclass in zflux is a bare parameter holder: each defines what calling it does."""
    bare = []
    for name in zflux_modules():
        module = importlib.import_module(name)
        for cls_name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == name \
                    and obj.forward is torch.nn.Module.forward:
                bare.append(f"{name}.{cls_name}")
    assert not bare, f"nn.Module subclasses without a forward: {bare}"
