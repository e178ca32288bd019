"""bench/gpu.py, the prepared GPU script, runs end to end at its small CPU sizes and records every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "reward_model": ("images_per_s", "ms_per_image", "parameters_m"),
    "ddpo": ("sampling_samples_per_s", "training_samples_per_s", "epoch_s"),
    "alignprop": ("peak_mb_k1", "peak_mb_kall"),
}


def test_small_cpu_run_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "bench_gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--device", "cpu", "--dtype", "float32",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["small"] is True
    assert report["torch"] and report["wall_s"] > 0
    assert set(report["sections"]) == set(FIGURES)
    for section, keys in FIGURES.items():
        figures = report["sections"][section]
        assert "error" not in figures, f"{section}: {figures.get('error')}"
        for key in keys:
            assert figures[key] > 0, f"{section}.{key} = {figures[key]}"
    assert "images_per_s" in done.stdout and "total wall time" in done.stdout  # the printed table
