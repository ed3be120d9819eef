"""Real English text, offline: Jane Austen's six novels from Debian's `r-cran-janeaustenr`.

The package is fetched with `apt-get download`, unpacked with `dpkg-deb -x`, and its R
lazy-load database is decoded by `h2okit.rdata` (no R needed). The novels are cached as
plain `.txt` files; a user may pass any text file or folder of `.txt` files instead.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .io import write_bytes_atomic
from .paths import cache_root
from .rdata import read_lazyload_db

DEBIAN_PACKAGE = "r-cran-janeaustenr"
# R object name -> file stem; order is the order of the text stream (P&P first: the prompt's book).
BOOKS = {
    "prideprejudice": "pride_and_prejudice",
    "sensesensibility": "sense_and_sensibility",
    "emma": "emma",
    "mansfieldpark": "mansfield_park",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


class CorpusError(RuntimeError):
    """The text corpus could not be found or made. Its message is one line."""


def austen_dir() -> Path:
    return cache_root() / "corpus" / "austen"


def _reflow(lines: list[str | None]) -> str:
    """Join the package's hard-wrapped lines into paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusError(f"'{cmd[0]}' not found: the Austen corpus needs Debian's apt tools "
                          f"(or pass your own text with --corpus)") from None


def _download_deb(workdir: Path) -> Path:
    result = _run(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update"], workdir)
        result = _run(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusError(f"apt-get download {DEBIAN_PACKAGE} failed: {last}")
    return debs[-1]


def extract_austen(deb: Path, out_dir: Path) -> list[Path]:
    """Decode the novels from a downloaded .deb into `out_dir/*.txt`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = _run(["dpkg-deb", "-x", str(deb), tmp], Path(tmp))
        if result.returncode != 0:
            raise CorpusError(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()}")
        found = list(Path(tmp).rglob("janeaustenr/data/Rdata.rdb"))
        if not found:
            raise CorpusError(f"{deb.name} has no janeaustenr/data/Rdata.rdb")
        objects = read_lazyload_db(found[0])
    missing = [name for name in BOOKS if name not in objects]
    if missing:
        raise CorpusError(f"{deb.name} lacks the novels {', '.join(missing)}")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, stem in BOOKS.items():
        (staging / f"{stem}.txt").write_text(_reflow(objects[name]), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return [out_dir / f"{stem}.txt" for stem in BOOKS.values()]


def ensure_austen(fetch: bool = True) -> Path:
    """The folder of decoded novels; made on first use when `fetch` (`h2okit prepare` fetches; a
    benchmark never installs anything and asks for `h2okit prepare` instead)."""
    folder = austen_dir()
    if all((folder / f"{stem}.txt").is_file() for stem in BOOKS.values()):
        return folder
    if not fetch:
        raise CorpusError(f"the Austen corpus is not prepared in {folder}; run `h2okit prepare` once "
                          f"(or pass --corpus with your own text)")
    with tempfile.TemporaryDirectory() as tmp:
        extract_austen(_download_deb(Path(tmp)), folder)
    return folder


def load_texts(source: str | Path | None = None, fetch: bool = False) -> dict[str, str]:
    """Named texts: the Austen novels (default; prepared by `h2okit prepare`, or fetched here when
    `fetch`), one text file, or a folder of `.txt` files."""
    if source is None:
        folder = ensure_austen(fetch)
        return {stem: (folder / f"{stem}.txt").read_text(encoding="utf-8") for stem in BOOKS.values()}
    path = Path(source)
    if path.is_file():
        return {path.stem: path.read_text(encoding="utf-8", errors="replace")}
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"text folder {path} has no .txt files")
        return {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}
    raise CorpusError(f"text source not found: {path} (give a .txt file or a folder of them)")


def body_start(text: str) -> int:
    """Offset of the first chapter's text, so prompts start in prose, not in a title page."""
    match = re.search(r"(?im)^chapter (1|i)\b.*$", text)
    return match.end() + 1 if match else 0


def token_stream(tokenizer, texts: dict[str, str], n_tokens: int, start_text: int = 0,
                 skip_tokens: int = 0) -> list[int]:
    """n_tokens consecutive token ids of real text: texts in order from `start_text`, each from its
    first chapter, skipping `skip_tokens` first. Deterministic, so every configuration sees the
    same prompt. Raises CorpusError if the texts are too short."""
    names = list(texts)
    ids: list[int] = []
    need = skip_tokens + n_tokens
    for name in names[start_text:] + names[:start_text]:
        text = texts[name][body_start(texts[name]):].lstrip()
        # Tokenize a generous prefix (English runs ~4 chars/token) rather than a whole novel.
        prefix = text[: (need - len(ids)) * 8 + 1000]
        encoded = tokenizer.encode(prefix, add_special_tokens=False)
        if len(ids) + len(encoded) < need and len(prefix) < len(text):
            encoded = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(encoded)
        if len(ids) >= need:
            return ids[skip_tokens:need]
    raise CorpusError(f"the texts hold {len(ids)} tokens; {need} were asked for")


# --- quality windows (the protocol every budget comparison uses) ------------------------------
# Texts in this order first (the order of the measurements the policy issue compared against),
# then any others; window starts as fractions of each text, the whole list at each fraction.
WINDOW_TEXT_ORDER = ("emma", "pride_and_prejudice", "persuasion", "sense_and_sensibility", "mansfield_park",
                     "northanger_abbey")
WINDOW_FRACTIONS = (0.3, 0.7, 0.5, 0.1, 0.9, 0.2, 0.4, 0.6, 0.8)
# The quality evaluation's defaults: docs/measurements.md ("How many quality windows") has the measurement
# behind them.
DEFAULT_WINDOWS = 40
DEFAULT_TOKENS = 256  # M: teacher-forced tokens per window


def window_plan(lengths: dict[str, int], span: int, count: int) -> list[tuple[str, int]]:
    """`count` (text, start) windows of `span` tokens: the first four texts of WINDOW_TEXT_ORDER at
    fraction 0.3, then the rest at 0.3, then all at 0.7, 0.5, ...; start = int(f * (n - span)).
    Pure, so the same windows come out for every configuration and every run."""
    names = [n for n in WINDOW_TEXT_ORDER if n in lengths] + sorted(n for n in lengths if n not in WINDOW_TEXT_ORDER)
    names = [n for n in names if lengths[n] >= span]
    if not names:
        raise CorpusError(f"no text holds a window of {span} tokens")
    plan = [(name, int(f * (lengths[name] - span))) for f in WINDOW_FRACTIONS for name in names]
    if count > len(plan):
        raise CorpusError(f"{count} windows asked for; {len(names)} text(s) x {len(WINDOW_FRACTIONS)} "
                          f"fractions give at most {len(plan)}")
    return plan[:count]


def tokenized_texts(tokenizer, texts: dict[str, str]) -> dict[str, np.ndarray]:
    """Each text tokenized whole, without special tokens; cached on disk per tokenizer and text."""
    out = {}
    folder = cache_root() / "tokens"
    tok_id = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    for name, text in texts.items():
        digest = hashlib.sha256(f"{tok_id}\0{text}".encode()).hexdigest()[:24]
        path = folder / f"{digest}.npy"
        try:
            out[name] = np.load(path)
            continue
        except (OSError, ValueError):
            pass
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, ids)
        write_bytes_atomic(path, buffer.getvalue())
        out[name] = ids
    return out
