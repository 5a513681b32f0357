"""Smoke run of benchmarks/bench_captum.py at tiny sizes: asserts its correctness gates only (no timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("captum")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_captum.py"


def test_bench_captum_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_captum", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    mod.main(["--smoke", "--json", str(out)])  # raises SystemExit if a correctness gate fails
    data = json.loads(out.read_text())
    assert data["smoke"] is True
    assert {"t3", "naive_loop", "head_b"} <= set(data)
    assert 0 < data["head_b"]["f"] < 1 and data["head_b"]["bound"] == pytest.approx(1 + 6 * data["head_b"]["f"])
    assert "Captum loop / reprlens" in capsys.readouterr().out
