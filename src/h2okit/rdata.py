"""R lazy-load databases (`.rdx` index + `.rdb` blobs), as CRAN data packages ship them: only the
framing lives here (the index, and each entry's 4-byte length + zlib blob); the R serialization
inside is read by the `rdata` package. This is how the Austen corpus comes from Debian's
`r-cran-janeaustenr` without R."""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import rdata as _rdata


class RDataError(ValueError):
    """The file is not an R lazy-load database this reader understands; one line."""


def unserialize(data: bytes) -> Any:
    """One R serialization (XDR, versions 2 and 3) -> Python values (a character vector is a numpy array
    of str, NA_character_ is None)."""
    try:
        with warnings.catch_warnings():  # a bare serialization has no RDS/RData magic: that is expected here
            warnings.simplefilter("ignore", UserWarning)
            parsed = _rdata.parser.parse_data(data, expand_altrep=True)
        return _rdata.conversion.convert(parsed)
    except Exception as exc:  # the parser raises whatever its input provokes: name it as ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RDataError(f"not an R serialization this reader understands ({type(exc).__name__}: {first})") \
            from None


def _blob(raw: bytes) -> bytes:
    """Lazy-load blobs are a 4-byte big-endian length and then zlib data (type 1)."""
    if len(raw) < 5:
        raise RDataError("lazy-load entry too short")
    size = struct.unpack(">I", raw[:4])[0]
    if raw[4:5] in (b"Z", b"2", b"X", b"0"):
        raise RDataError("only zlib-compressed lazy-load databases are supported")
    try:
        data = zlib.decompress(raw[4:])
    except zlib.error as exc:
        raise RDataError(f"lazy-load entry is not zlib data ({exc})") from None
    if len(data) != size:
        raise RDataError(f"lazy-load entry decompressed to {len(data)} bytes, header says {size}")
    return data


def _strings(value: Any) -> list[str | None]:
    return [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in list(value)]


def read_lazyload_db(rdb: Path) -> dict[str, list[str | None]]:
    """The character vectors of `X.rdb` (with its `X.rdx` beside it), by variable name."""
    rdx = rdb.with_suffix(".rdx")
    raw_index = rdx.read_bytes()
    index = unserialize(gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else _blob(raw_index))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx}: index has no 'variables'")
    blob = rdb.read_bytes()
    result = {}
    for name, where in index["variables"].items():
        offset, length = (int(x) for x in where)
        result[str(name)] = _strings(unserialize(_blob(blob[offset:offset + length])))
    return result
