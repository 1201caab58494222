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
