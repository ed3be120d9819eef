import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "smollm2-135m.json"
SEED_CONFIG = ROOT / "configs" / "smollm2-135m-seed.json"


def pytest_terminal_summary(terminalreporter):
    """The machine, printed after the results (also under -q, as CI runs), so that a failure seen only in
    CI can be matched to its CPU (the kernels are built with -march=native)."""
    from h2okit.cpu import cpu_flags, cpu_model

    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in cpu_flags()]
    terminalreporter.write_line(f"machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs, "
                                f"{' '.join(isa) or 'no AVX2'}")


def eviction_plans(cache):
    """Every eviction of a cache, comparable across runs: (layer, length, kept runs)."""
    return [(e.layer, e.plan.length, e.plan.runs) for e in cache.events.evictions]


@functools.lru_cache(maxsize=1)
def _loaded():
    from h2okit.config import load_config
    from h2okit.model import load_model, resolve_model_path

    return load_model(resolve_model_path(load_config(DEFAULT_CONFIG)))


@pytest.fixture(scope="session")
def loaded_model():
    """The default model (SmolLM2-135M), loaded once per test session."""
    import torch

    torch.set_num_threads(2)
    return _loaded()


@pytest.fixture(scope="session")
def texts():
    from h2okit.corpus import load_texts

    return load_texts()


def write_config(tmp_path, base=SEED_CONFIG, **overrides):
    raw = json.loads(base.read_text())
    raw.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def parse_markdown_rows(text):
    """Rows of the first markdown table in `text`, as dicts (a deliberately independent reader)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
