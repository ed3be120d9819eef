"""A small reader for R's lazy-load databases (`.rdx` index + `.rdb` blobs).

Only what is needed to read character vectors (and the lists/pairlists/attributes
around them) out of a CRAN data package, so that the Austen corpus can be had from
Debian's `r-cran-janeaustenr` without R. Format: R Internals, "Serialization Formats".
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RDataError(ValueError):
    """The file is not an R serialization this reader understands."""


# SEXP type codes (R Internals §1.1) and the serialization-only pseudo types.
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, VECSXP = 9, 10, 13, 14, 15, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 250, 242, 241
NA_INT = -(2**31)


@dataclass
class RObject:
    """A decoded R value: `value` is a Python list/str/None, `attributes` a dict."""

    sexptype: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("truncated R serialization")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RDataError("not an XDR R serialization (expected 'X\\n')")
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE_SXP or kind in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP,
                                            UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if kind in (LISTSXP, LANGSXP):  # pairlist: attr?, tag?, car, cdr
            attrs = self.attributes() if has_attr else {}
            tag = self.item() if has_tag else None
            head = self.item()
            tail = self.item()
            pairs = [(tag, head)] + (tail.value if isinstance(tail, RObject) and tail.sexptype == LISTSXP else [])
            return RObject(LISTSXP, pairs, attrs)
        if kind == ENVSXP:
            env = RObject(ENVSXP, None)
            self.refs.append(env)
            self.int()  # locked
            enclos, frame, hashtab = self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            env.attributes = self.item() or {}
            return env
        if kind in (CLOSXP, PROMSXP):
            attrs = self.attributes() if has_attr else {}
            env = self.item() if has_tag else None
            formals, body = self.item(), self.item()
            return RObject(kind, {"env": env, "formals": formals, "body": body}, attrs)
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            values = list(struct.unpack(f">{n}i", self.take(4 * n)))
            value = [None if v == NA_INT else v for v in values]
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == CPLXSXP:
            n = self.length()
            flat = struct.unpack(f">{2 * n}d", self.take(16 * n))
            value = [complex(flat[i], flat[i + 1]) for i in range(0, 2 * n, 2)]
        elif kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"unsupported SEXP type {kind} in R serialization")
        return RObject(kind, value, self.attributes() if has_attr else {})

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject) or attrs.sexptype != LISTSXP:
            return {}
        return {str(tag): value for tag, value in attrs.value}


def unserialize(data: bytes) -> Any:
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _blob(raw: bytes) -> bytes:
    """Lazy-load blobs are a 4-byte big-endian length and then zlib data (type 1)."""
    if len(raw) < 5:
        raise RDataError("lazy-load entry too short")
    size = struct.unpack(">I", raw[:4])[0]
    if raw[4:5] in (b"Z", b"2", b"X", b"0"):
        raise RDataError("only zlib-compressed lazy-load databases are supported")
    data = zlib.decompress(raw[4:])
    if len(data) != size:
        raise RDataError(f"lazy-load entry decompressed to {len(data)} bytes, header says {size}")
    return data


def read_lazyload_db(rdb: Path) -> dict[str, RObject]:
    """All variables of `X.rdb` (with its `X.rdx` beside it), decoded."""
    rdx = rdb.with_suffix(".rdx")
    raw_index = rdx.read_bytes()
    index_bytes = gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else _blob(raw_index)
    index = unserialize(index_bytes)
    if not isinstance(index, RObject) or index.sexptype != VECSXP:
        raise RDataError(f"{rdx}: index is not a list")
    names = index.attributes.get("names")
    entries = dict(zip(names.value, index.value)) if names else {}
    variables = entries.get("variables")
    if variables is None:
        raise RDataError(f"{rdx}: index has no 'variables'")
    blob = rdb.read_bytes()
    result = {}
    for name, where in zip(variables.attributes["names"].value, variables.value):
        offset, length = (int(x) for x in where.value)
        result[name] = unserialize(_blob(blob[offset : offset + length]))
    return result
