"""eval/bench_native.py, shrunk: every kernel and a warm call timed with and without the
native kernels, paired."""

import importlib.util
import json
from pathlib import Path

import pytest

from lwm.models import native

_spec = importlib.util.spec_from_file_location(
    "lwm_eval_bench_native", Path(__file__).resolve().parents[1] / "eval" / "bench_native.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(not native.ENABLED, reason="LWM_NATIVE=0 turned the kernels off")
def test_bench_native_pairs_every_kernel_and_a_warm_call(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "K", 64)
    monkeypatch.setattr(bench, "ITERATIONS", 2)
    out = tmp_path / "native.json"
    result = bench.main(["--rows", "1", "8", "--rounds", "2", "--calls", "2", "--call-rounds",
                         "2", "--json", str(out)])
    assert set(result["kernels"]) == {"mamba2 layer step", "mamba2 stack step",
                                      "predict_latent mlp", "predict_latent ego",
                                      "predict_latent map", "map step"}
    for by_rows in result["kernels"].values():
        assert set(by_rows) == {"1", "8"}
        for f in by_rows.values():
            assert f["native_ms"] > 0 and f["pytorch_ms"] > 0 and f["ratio"] > 0
    call = result["calls"]["untrained small"]
    assert call["rounds"] == 4 and 0 <= call["same_plans"] <= 4 and call["ratio"] > 0
    assert json.loads(out.read_text())["kernels"] == result["kernels"]
    assert native.ENABLED  # switched off only while it times the PyTorch path
