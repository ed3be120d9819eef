"""The R lazy-load reader, on databases written here by a tiny XDR serializer."""

import gzip
import struct
import zlib

import pytest

from h2okit.corpus import _reflow, body_start
from h2okit.rdata import RDataError, read_lazyload_db, unserialize

HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def _int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    if s is None:
        return _int(9) + _int(-1)
    raw = s.encode()
    return _int(9 | (1 << 15)) + _int(len(raw)) + raw  # UTF-8 flag bit as R writes it


def _strsxp(values, names=None):
    body = _int(len(values)) + b"".join(_charsxp(v) for v in values)
    return (_int(16 | (HAS_ATTR if names else 0)) + body + (_attrs(names) if names else b""))


def _realsxp(values):
    return _int(14) + _int(len(values)) + b"".join(struct.pack(">d", v) for v in values)


def _vecsxp(items, names):
    return _int(19 | HAS_ATTR) + _int(len(items)) + b"".join(items) + _attrs(names)


def _attrs(names):
    # pairlist(names = STRSXP), tag is the symbol "names"
    return _int(2 | HAS_TAG) + _int(1) + _charsxp("names") + _strsxp(names) + _int(254)


def _serialize(item, version=3):
    head = b"X\n" + _int(version) + _int(0x040300) + _int(0x030500)
    if version == 3:
        head += _int(5) + b"UTF-8"
    return head + item


def _write_db(tmp_path, objects):
    blob, where = b"", []
    for value in objects.values():
        data = _serialize(value)
        entry = struct.pack(">I", len(data)) + zlib.compress(data)
        where.append(_realsxp([len(blob), len(entry)]))
        blob += entry
    index = _vecsxp([_vecsxp(where, list(objects)), _vecsxp([], []), _int(10) + _int(1) + _int(1)],
                    ["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    return tmp_path / "Rdata.rdb"


def test_reads_character_vectors_from_a_lazy_load_db(tmp_path):
    db = read_lazyload_db(_write_db(tmp_path, {
        "emma": _strsxp(["EMMA", "", "Emma Woodhouse, handsome,", None, "clever"]),
        "persuasion": _strsxp(["Sir Walter"]),
    }))
    assert db["emma"] == ["EMMA", "", "Emma Woodhouse, handsome,", None, "clever"]
    assert db["persuasion"] == ["Sir Walter"]


def test_version_2_vectors():
    assert list(unserialize(_serialize(_strsxp(["a", "b"]), version=2))) == ["a", "b"]


def test_truncated_and_foreign_data_are_rejected(tmp_path):
    good = _serialize(_strsxp(["hello"]))
    with pytest.raises(RDataError, match="not an R serialization"):
        unserialize(b"A\n" + good[2:])
    # a truncated entry: the framing's length and zlib checks catch it (the parser itself would not)
    db = _write_db(tmp_path, {"emma": _strsxp(["hello"])})
    db.write_bytes(db.read_bytes()[:-5])
    with pytest.raises(RDataError, match="lazy-load entry"):
        read_lazyload_db(db)


def test_reflow_joins_hard_wrapped_lines_into_paragraphs():
    assert _reflow(["It is a truth", "universally acknowledged.", "", "", "However", None]) == \
        "It is a truth universally acknowledged.\n\nHowever\n"
    text = "PRIDE\n\nChapter 1\n\nIt is a truth"
    assert text[body_start(text):].lstrip().startswith("It is a truth")
