"""benchmarks/gpu_check.py keeps working: its --tiny mode runs every setting and decoder on CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_settings_and_both_decoders_at_the_tiny_size(tmp_path):
    """eager and compiled+fp8 (which compiles too: "compiled" alone runs the same code, so CI skips
    its extra warm-up)."""
    out = tmp_path / "check.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--chunks", "2", "--warmup", "1",
        "--settings", "eager,compiled+fp8", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {(r["setting"], r["decoder"]): r for r in report["results"]}
    assert set(results) == {(s, d) for s in ("eager", "compiled+fp8") for d in ("wan", "tiny")}
    for (setting, decoder), r in results.items():
        assert r["skipped"] is None, (setting, decoder, r["skipped"])
        assert r["dit_ms"] > 0 and r["vae_ms"] > 0 and r["encode_ms"] > 0 and r["fps"] > 0
        assert r["chunk_total_ms_p95"] >= r["chunk_total_ms_p50"] > r["dit_ms"]
        assert r["recompiles"] == 0  # the compiled settings run on their warmed-up graphs
        assert set(r["ratios_to_eager"]) >= {"dit_speedup", "chunk_total_speedup", "fps"}
    assert results[("eager", "wan")]["ratios_to_eager"]["dit_speedup"] == 1.0
    assert "compiled+fp8  tiny" in done.stdout  # the printed table
