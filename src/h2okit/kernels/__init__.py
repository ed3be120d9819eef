"""Build (once per machine) and load the C kernels of the fast decode path.

`llama_decode.c` is compiled with the system C compiler (`$CC`, else `cc`) for this CPU
(`-march=native`) into the user cache folder, keyed by a hash of the source, its header, the
flags, the compiler's version and the CPU's instruction sets, so an edit, a new compiler or a user
cache shared with another kind of CPU rebuilds it. It links OpenMP from
the same libgomp torch has loaded, so the kernels share torch's threads (`torch.set_num_threads`).

The interface is declared once, in `h2okit_kernels.h`: the C source includes it and cffi (ABI
mode) reads it, so every call is type-checked against the same prototypes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import cffi
from filelock import FileLock

from ..cpu import cpu_flags
from ..paths import cache_root

SOURCE = Path(__file__).with_name("llama_decode.c")
HEADER = Path(__file__).with_name("h2okit_kernels.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

ffi = cffi.FFI()
ffi.cdef(HEADER.read_text())
# dtype codes, from the header
_DTYPES = ffi.typeof("enum h2k_dtype").relements
F32, BF16, F16 = _DTYPES["H2K_F32"], _DTYPES["H2K_BF16"], _DTYPES["H2K_F16"]
Q4_1, Q8_0 = _DTYPES["H2K_Q4_1"], _DTYPES["H2K_Q8_0"]
_LAYOUT = ffi.typeof("enum h2k_layout").relements
QGROUP = _LAYOUT["H2K_QGROUP"]  # rows per group of a quantized matrix's blocks
BF16_TILE = _LAYOUT["H2K_BF16_TILE"]  # rows per tile of a bf16 weight matrix
_PAIR_BLOCK = 16  # columns per pair-ordered block of a bf16 tile (two 8-lane vectors)
_ACTS = ffi.typeof("enum h2k_act").relements
SILU, GELU_TANH = _ACTS["H2K_SILU"], _ACTS["H2K_GELU_TANH"]
NULL = ffi.NULL


def bf16_tiles(weights):
    """A bf16 weight matrix [rows, cols] in the kernels' tiled layout (llama_decode.c, gemv_bf16_tiles),
    same shape and dtype: rows in tiles of BF16_TILE (the last may be shorter); per tile, each full
    block of 16 columns as the tile's rows' 16 weights in pair order (32-bit word i: columns i and
    i + 8), then the rows' remaining cols % 16 weights row by row."""
    import torch

    rows, cols = weights.shape
    full = cols // _PAIR_BLOCK * _PAIR_BLOCK

    def tiles(part, n):  # part [count * n, cols] -> [count, n * cols], each tile laid out
        count = part.shape[0] // n
        blocks = (part[:, :full].reshape(count, n, full // _PAIR_BLOCK, 2, _PAIR_BLOCK // 2)
                  .permute(0, 2, 1, 4, 3).reshape(count, n * full))
        return torch.cat([blocks, part[:, full:].reshape(count, n * (cols - full))], dim=1)

    whole = rows // BF16_TILE * BF16_TILE
    laid = [tiles(weights[:whole], BF16_TILE).reshape(-1)]
    if whole < rows:
        laid.append(tiles(weights[whole:], rows - whole).reshape(-1))
    return torch.cat(laid).view(rows, cols)


def ptr(tensor) -> object:
    """A tensor's data as a `void *` for the kernels (cffi passes it to any pointer parameter)."""
    return ffi.cast("void *", tensor.data_ptr())


def address(value: int) -> object:
    return ffi.cast("void *", value)


class KernelBuildError(Exception):
    """No compiler, or the compile failed; the message is one line."""


_loaded = None  # the cffi library object, once loaded
loaded_path: Path | None = None


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler '{cc}' on PATH (set CC); the fast decode path needs one")
    return cc


def cpu_signature() -> str:
    """What `-march=native` depends on: the machine type and the CPU's feature flags (the processor
    name where the flags are unknown)."""
    flags = cpu_flags()
    return f"{platform.machine()} {' '.join(sorted(flags)) if flags else platform.processor()}"


# Narrower builds of the same source for the tests, so that each vector width's kernels are checked on
# any x86 machine that can run them (-march=native alone checks only the widest the CPU has).
NARROWER = {"avx2": ("-mno-avx512f",), "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")}


def library_path(cc: str, extra: tuple[str, ...] = ()) -> Path:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"cannot run C compiler '{cc}': {exc}") from None
    digest = hashlib.sha256(SOURCE.read_bytes() + HEADER.read_bytes() + " ".join(FLAGS + extra).encode()
                            + version.encode() + cpu_signature().encode()).hexdigest()
    return cache_root() / "kernels" / f"llama_decode-{digest[:16]}.so"


def build_id() -> str | None:
    """The hash naming the kernel build in use (source, flags, compiler), or None without a compiler."""
    try:
        return library_path(_compiler()).stem.split("-", 1)[1]
    except KernelBuildError:
        return None


def vector_isa() -> str:
    """Which vector kernels the build uses, for the decode-path line and result metadata."""
    return {16: "AVX-512", 8: "AVX2"}.get(load().h2k_vector_lanes(), "portable C, not vectorised by hand")


def build(cc: str, target: Path, extra: tuple[str, ...] = ()) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    result = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", str(staging)], capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {first}")
    staging.replace(target)  # atomic: concurrent builders never see a half-written library


def _built(extra: tuple[str, ...]) -> Path:
    import torch  # noqa: F401  (torch's libgomp first, so ours resolves to it)

    cc = _compiler()
    path = library_path(cc, extra)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # several llm_bench processes may start at once
            if not path.is_file():
                build(cc, path, extra)
    return path


def load():
    """The compiled kernels (built on first use; ~1 s)."""
    global _loaded, loaded_path
    if _loaded is None:
        path = _built(())
        _loaded = ffi.dlopen(str(path))
        loaded_path = path
    return _loaded


def load_narrower(name: str):
    """A build of the kernels limited to a narrower instruction set (NARROWER[name]), for the tests; x86 only."""
    return ffi.dlopen(str(_built(NARROWER[name])))


# The phase timers of a profiled build (llama_decode.c, H2K_PROFILE): not in the header, since the shipped
# build has none.
PROFILE = ("-DH2K_PROFILE",)
_timers_ffi = cffi.FFI()
_timers_ffi.cdef("const char *h2k_profile_name(int i); void h2k_profile_take(double *seconds, int n);")


class PhaseTimers:
    """A profiled build's timers: `names` (the phases of a decode step, in order) and `take()`, each
    phase's seconds since the last take (summed over calls; the attention's own phases on OpenMP thread 0,
    and on thread 1 as `<phase>_thread1`)."""

    def __init__(self, path: Path):
        self._lib = _timers_ffi.dlopen(str(path))  # the same library as the kernels' (dlopen counts it once)
        names = []
        while (name := self._lib.h2k_profile_name(len(names))) != _timers_ffi.NULL:
            names.append(_timers_ffi.string(name).decode())
        self.names = names
        self._seconds = _timers_ffi.new("double[]", len(names))

    def take(self) -> dict[str, float]:
        self._lib.h2k_profile_take(self._seconds, len(self.names))
        return dict(zip(self.names, self._seconds))


def load_profiled():
    """The kernels built with phase timers around each part of the fused decode step (H2K_PROFILE; the same
    arithmetic), for benchmarks/step_phases.py: (the kernels, their PhaseTimers)."""
    path = _built(PROFILE)
    return ffi.dlopen(str(path)), PhaseTimers(path)
