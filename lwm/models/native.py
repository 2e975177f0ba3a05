"""lwm's native CPU kernels (`native.cpp`), built on first use and optional.

Imagination steps a few dozen to a few hundred rows at a time, where eager PyTorch pays each
op's fixed cost (ATen dispatch, allocation, the Python call) many times over its arithmetic.
`native.cpp` keeps the matmuls in ATen and runs what lies between them as one loop over the rows.
Each kernel stands beside the pure-PyTorch path it replaces, which stays the reference (tested for
equivalence in tests/test_native.py) and the fallback.

The kernels compile with torch's C++ extension builder (a C++ compiler and ninja) the first time
they are needed, about 30 s, into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions); later processes load the built library. `lwm kernels` builds them
ahead (the Makefile's install does). If the build fails, lwm warns once and runs the
PyTorch path. `LWM_NATIVE=0` in the environment turns them off.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.cpp")

ENABLED = os.environ.get("LWM_NATIVE", "1") != "0"
"""Whether `kernels()` may build and return the kernels (tests switch it to run the reference)."""

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _flags(openmp: bool = True) -> tuple[str, list[str], list[str]]:
    """The module name, compiler flags and linker flags for this CPU. The library is built where
    it runs, so it may use the vector instructions torch itself found here; the name carries
    them, so a cache shared by different machines keeps one build per kind."""
    # -fno-trapping-math: nothing here reads floating-point traps, and without it the compiler
    # may not vectorize a loop with a comparison in it (the exp's clamp). -fopenmp: the row loop
    # is `at::parallel_for`, serial without it.
    name, flags = "lwm_native", ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if capability in ("AVX2", "AVX512"):
        name, flags = name + "_avx2", [*flags, "-mavx2", "-mfma"]
    if not openmp:
        return name + "_serial", flags, []
    return name, [*flags, "-fopenmp"], ["-fopenmp"]


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) `native.cpp`; raises if that fails. A compiler
    without OpenMP (Apple's clang) gets a build whose row loops run on one thread."""
    from torch.utils.cpp_extension import load

    # torch runs the first `ninja` on PATH. Another ninja version rebuilds the cached library
    # (measured: a shell with the environment activated and `make` without it took turns
    # rebuilding), so prefer the one installed beside this interpreter (lwm depends on it).
    path = os.environ.get("PATH", "")
    if (Path(sys.executable).parent / "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        name, cflags, ldflags = _flags()
        return load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                    extra_ldflags=ldflags, verbose=verbose)
    except Exception:
        name, cflags, ldflags = _flags(openmp=False)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                    extra_ldflags=ldflags, verbose=verbose)
    finally:
        os.environ["PATH"] = path


def kernels() -> ModuleType | None:
    """The built kernels, or None when `ENABLED` is off or they cannot be built (warned once).

    The first call builds them if no cached build matches the source: tens of seconds, said on
    stderr."""
    if not ENABLED:
        return None
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _try_build()
    return _state["module"]


def _try_build() -> ModuleType | None:
    # said only when the load takes long, i.e. when it builds
    notice = threading.Timer(3.0, print, ("lwm: building the native CPU kernels (once, about "
                                          "30 s; LWM_NATIVE=0 skips them)",),
                             {"file": sys.stderr, "flush": True})
    notice.start()
    try:
        return build()
    except Exception as error:  # no compiler, no ninja, a failed build: the reference path runs
        warnings.warn(
            f"lwm's native CPU kernels could not be built ({type(error).__name__}: "
            f"{str(error).strip()[:400]}); imagination runs the pure-PyTorch path, which is "
            "slower. `lwm kernels --verbose` shows the build log; LWM_NATIVE=0 silences this.",
            RuntimeWarning, stacklevel=3)
        return None
    finally:
        notice.cancel()


@contextmanager
def switched(on: bool) -> Iterator[None]:
    """Within the block the kernels are used if `on` (and `ENABLED` was on: LWM_NATIVE=0 stays
    off); after it, `ENABLED` is as it was. Benchmarks and tests time or check the PyTorch
    path with `switched(False)`."""
    global ENABLED
    before = ENABLED
    ENABLED = before and on
    try:
        yield
    finally:
        ENABLED = before


def for_imagination(x: Tensor) -> ModuleType | None:
    """`kernels()` where they apply to x: a float32 tensor on the CPU, autograd off (the kernels
    compute no gradients); else None, and the caller runs its PyTorch path."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return kernels()
