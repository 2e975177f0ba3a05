"""lwm.runtime: malloc keeps freed memory for reuse instead of faulting in fresh pages."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, os, sys
from lwm.runtime import keep_freed_memory
applied = keep_freed_memory()
assert keep_freed_memory() == applied  # once per process, the same answer
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
blocks = [libc.malloc(256 * 1024) for _ in range(64)]  # 16 MiB in blocks the size of a step's
for block in blocks:
    ctypes.memset(block, 1, 256 * 1024)  # touched: resident
for block in reversed(blocks):
    libc.free(block)
print(applied, (rss() - base) >> 20)  # MiB still resident after the frees
"""


def run(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_for_reuse():
    # Kept, the next allocations reuse these pages instead of faulting in fresh ones.
    applied, kept = run({})
    assert applied
    assert kept >= 12
    # Opting out leaves malloc as it is: it hands the freed top of its heap back.
    applied, kept = run({"LWM_KEEP_FREED_MEMORY": "0"})
    assert not applied
    assert kept <= 2


def test_planning_applies_it_once(monkeypatch):
    import torch

    import lwm.runtime as runtime
    from lwm.models.world_model import WorldModel, preset
    from lwm.planning.base import PrefixTree

    calls = []
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setattr(runtime, "_apply", lambda: calls.append(1) or True)
    model = WorldModel(preset("debug")).eval()
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 7, 7, 3), torch.zeros(1), torch.zeros(1, 2))
        h, state = model.next(model.init_state(1), z, torch.full((1,), model.START))
    goal = torch.randn(1, model.cfg.goal_dim)
    PrefixTree(model, state, h, goal)
    PrefixTree(model, state, h, goal)
    assert calls == [1]  # by the first tree, once a process
