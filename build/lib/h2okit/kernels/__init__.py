"""Build (once per machine) and load the C kernels of the fast decode path.

`llama_decode.c` is compiled with the system C compiler (`$CC`, else `cc`) for this CPU
(`-march=native`) into the user cache folder, keyed by a hash of the source, the flags and
the compiler's version, so an edit or a new compiler rebuilds it. It links OpenMP from the
same libgomp torch has loaded, so the kernels share torch's threads (`torch.set_num_threads`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from filelock import FileLock

from ..paths import cache_root

SOURCE = Path(__file__).with_name("llama_decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

# dtype codes shared with the C source
F32, BF16, F16 = 0, 1, 2

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "h2k_norm_gemv": (None, [_I, _P, _P, _F, _P, _I, _I, _P, _P, _I, _I, _P, _P]),
    "h2k_mlp_block": (None, [_I, _P, _I, _P, _I, _P, _P, _F, _P, _I, _P, _P, _P]),
    "h2k_attend": (None, [_P, _I, _I, _I, _P, _P, _L, _I, _I, _F, _P, _P, _P, _P, _I]),
    "h2k_attention_input": (None, [_I, _P, _P, _F, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _L, _I]),
    "h2k_store_row": (None, [_P, _P, _I, _I]),
    "h2k_read_sum": (_F, [_P, _L]),
}


class KernelBuildError(Exception):
    """No compiler, or the compile failed; the message is one line."""


_loaded: ctypes.CDLL | None = None


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler '{cc}' on PATH (set CC); the fast decode path needs one")
    return cc


def library_path(cc: str) -> Path:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"cannot run C compiler '{cc}': {exc}") from None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()
    return cache_root() / "kernels" / f"llama_decode-{digest[:16]}.so"


def build_id() -> str | None:
    """The hash naming the kernel build in use (source, flags, compiler), or None without a compiler."""
    try:
        return library_path(_compiler()).stem.split("-", 1)[1]
    except KernelBuildError:
        return None


def build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    result = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(staging)], capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {first}")
    staging.replace(target)  # atomic: concurrent builders never see a half-written library


def load() -> ctypes.CDLL:
    """The compiled kernels (built on first use; ~1 s)."""
    global _loaded
    if _loaded is None:
        import torch  # noqa: F401  (torch's libgomp first, so ours resolves to it)

        cc = _compiler()
        path = library_path(cc)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):  # several llm_bench processes may start at once
                if not path.is_file():
                    build(cc, path)
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _loaded = lib
    return _loaded
