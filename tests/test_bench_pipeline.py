"""scripts/bench_pipeline.py end to end at tiny sizes on the CPU: snapshot built, each implementation loaded, timed, reported."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_pipeline  # noqa: E402


def test_tiny_run_writes_every_row(tmp_path, capsys):
    bench_pipeline.main(["--tiny", "--device", "cpu", "--pipelines", "z-image-turbo", "--iters", "1", "--size", "32",
                         "--impls", "diffusers", "zflux", "zflux-fp8", "--work", str(tmp_path),
                         "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "z-image-turbo.json").read_text())
    assert [r["impl"] for r in result["rows"]] == ["diffusers", "zflux", "zflux-fp8"]
    for row in result["rows"]:
        assert row["e2e_s"] > 0 and row["encode_s"] > 0 and row["decode_s"] > 0 and row["load_s"] > 0
    table = capsys.readouterr().out
    assert "| z-image-turbo | eager | zflux |" in table and "1.00x" in table  # diffusers against itself
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the snapshot is deleted


def test_tiny_flux2_dev_in_memory(tmp_path, capsys):
    """FLUX.2 [dev], whose full-size snapshot no disk here holds: diffusers' pipeline assembled in memory, zflux's made
    from its tensors; zflux-fp8 last (it takes the transformer's weights over) whatever order is asked."""
    bench_pipeline.main(["--tiny", "--device", "cpu", "--pipelines", "flux2-dev", "--iters", "1", "--size", "32",
                         "--impls", "zflux-fp8", "diffusers", "zflux", "--work", str(tmp_path), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "flux2-dev.json").read_text())
    assert [r["impl"] for r in result["rows"]] == ["diffusers", "zflux", "zflux-fp8"]
    for row in result["rows"]:
        assert row["e2e_s"] > 0 and row["encode_s"] > 0 and row["decode_s"] > 0 and row["load_s"] > 0
    assert "| flux2-dev | eager | zflux-fp8 |" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the autoencoder and scheduler folder is deleted


def test_in_memory_run_takes_one_mode(tmp_path):
    """zflux-fp8 takes the assembled transformer's weights over: a second mode would find them gone, so it is refused first."""
    import pytest

    with pytest.raises(SystemExit, match="one --modes per run"):
        bench_pipeline.main(["--tiny", "--device", "cpu", "--pipelines", "flux2-dev", "--modes", "eager", "compiled",
                             "--work", str(tmp_path)])


def test_zflux_made_in_memory_is_diffusers_pipeline(tmp_path):
    """The in-memory route times one pipeline twice: zflux's [dev] made from diffusers' tiny one (fp32) gives its latents."""
    import torch

    from test_flux2_pipeline import PROMPT, TOL, reference
    from util import rel_err

    source = bench_pipeline.flux2_dev_assemble("cpu", tiny=True)
    size = dict(height=64, width=48)
    expected = reference(source, size, dict(num_inference_steps=2, guidance_scale=4.0, **size), seed=3)
    ours = bench_pipeline.flux2_from_diffusers(source, tmp_path, torch.device("cpu"), torch.float32, "zflux")
    got = ours.generate(PROMPT, seed=3, steps=2, guidance=4.0, output_type="latent", progress=False, **size)
    assert rel_err(got, expected) <= TOL


def test_full_size_flux2_dev_assembly_at_small_dims(tmp_path, monkeypatch):
    """The full-size branch of the in-memory assembly (Mistral 3 built straight in bf16, the [dev] preset, FLUX.2's own
    autoencoder), with a small language model and transformer: diffusers' pipeline runs, and zflux-fp8 made from it takes
    the transformer's weights over (diffusers' copy left on meta) and runs its fp8 linears."""
    import torch

    from test_flux2_pipeline import PROMPT
    from tiny_flux2 import TRANSFORMER
    from zflux.common.fp8 import FP8Linear
    from zflux.flux.flux2 import model

    monkeypatch.setattr(bench_pipeline, "MISTRAL_SMALL_3", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=31,
                                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    small = {k: tuple(v) if isinstance(v, list) else v for k, v in TRANSFORMER.items()} | dict(in_channels=128, guidance_embeds=True)
    monkeypatch.setitem(model.PRESETS, "flux2-dev", model.Flux2Config(**small))
    source = bench_pipeline.flux2_dev_assemble("cpu", tiny=False)
    assert next(source.text_encoder.parameters()).dtype == torch.bfloat16
    size = dict(height=32, width=32)
    source(prompt=PROMPT, num_inference_steps=1, guidance_scale=4.0, output_type="latent", **size)
    ours = bench_pipeline.flux2_from_diffusers(source, tmp_path, torch.device("cpu"), torch.bfloat16, "zflux-fp8")
    assert next(source.transformer.parameters()).is_meta
    assert isinstance(ours.transformer.single_blocks[0].linear2, FP8Linear)
    assert ours.generate(PROMPT, steps=1, output_type="latent", progress=False, **size).shape == (1, 32, 4, 4)
