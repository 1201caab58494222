"""scripts/bench_encode.py at a tiny size on the CPU: every implementation timed, the errors against diffusers reported."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_encode  # noqa: E402


def test_tiny_run_prints_both_cases(capsys):
    bench_encode.main(["--tiny", "--device", "cpu", "--warmup", "0", "--iters", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| prompt")]
    assert [row.split(" | ")[0] for row in rows] == ["| prompt (196 tokens)", "| prompt + empty negative (CFG)"]
    for row in rows:
        bf16_eager, bf16_graphed, fp32_eager, fp32_graphed = map(float, re.findall(r"\d\.\de[-+]\d+", row))
        assert max(fp32_eager, fp32_graphed) <= 1e-5 and max(bf16_eager, bf16_graphed) <= 2**-8  # tests/test_text.py's bars
