"""eval/bench_planning.py, shrunk: every search path is timed beside its legacy and
PyTorch-only runs."""

import importlib.util
import json
import os
from pathlib import Path

import lwm.planning.cem
import lwm.planning.mppi
from lwm.models import native
from lwm.planning.base import PrefixTree

_spec = importlib.util.spec_from_file_location(
    "lwm_eval_bench_planning", Path(__file__).resolve().parents[1] / "eval" / "bench_planning.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_bench_planning_times_every_path_beside_its_legacy_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "K", 96)
    monkeypatch.setattr(bench, "H", 4)
    monkeypatch.setattr(bench, "ITERATIONS", 2)
    out = tmp_path / "plan.json"
    result = bench.main(["--no-compile", "--rounds", "2", "--solo-rounds", "2", "--terminal", "q",
                         "--json", str(out)])
    paths = result["paths"]
    legacy = {name for name, r in paths.items() if r["mode"] == "legacy"}
    assert legacy == {"mamba2 legacy cem q-terminal", "mamba2 legacy mppi q-terminal"}
    assert set(result["speedup_over_legacy"]) == {"mamba2 cem q-terminal",
                                                  "mamba2 mppi q-terminal"}
    for r in paths.values():
        assert r["warm_ms"] > 0 and r["warm_rows_stepped"] > 0 and r["terminal"] == "q"
        # two calls alone, after one to settle, kept apart from the interleaved rounds
        assert len(r["solo_calls_ms"]) == 2 and len(r["calls_ms"]) == 2
        assert r["warm_solo_ms"] > 0
    assert json.loads(out.read_text())["speedup_over_legacy"] == result["speedup_over_legacy"]
    # Each path also runs without the native kernels, and the ratio is reported.
    assert result["native_kernels"] is native.ENABLED  # on unless LWM_NATIVE=0
    assert set(result["speedup_over_pytorch"]) == set(result["speedup_over_legacy"])
    assert {r["mode"] for r in paths.values()} == {"eager", "pytorch", "legacy"}
    # The legacy runs swap the planners' tree, and the pytorch runs switch the kernels off,
    # only while they plan.
    assert lwm.planning.cem.PrefixTree is PrefixTree and lwm.planning.mppi.PrefixTree is PrefixTree
    assert native.ENABLED is (os.environ.get("LWM_NATIVE", "1") != "0")
