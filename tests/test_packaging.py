"""What a non-editable install gets: the configs and presets as package data, the kernel source,
py.typed, the license; and the package's own entry points."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from h2okit.resources import find, names, packaged

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_configs_presets_kernels_and_typing(tmp_path):
    source = tmp_path / "src-copy"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("h2okit-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    for name in ("h2okit/presets/target_ratio.json", "h2okit/presets/target_speed.json", "h2okit/presets/aa.json",
                 "h2okit/configs/smollm2-135m.json", "h2okit/configs/smollm2-135m-seed.json",
                 "h2okit/configs/gemma3-270m.json", "h2okit/configs/gemma3-270m-seed.json",
                 "h2okit/kernels/llama_decode.c", "h2okit/kernels/h2okit_kernels.h", "h2okit/py.typed", "h2okit/__main__.py"):
        assert name in files, name
    assert any(f.endswith("licenses/LICENSE") or f.endswith("/LICENSE") for f in files)


def test_shipped_files_resolve_by_name_and_the_seed_paths_still_work():
    assert names("presets") == ["aa", "target_quality", "target_ratio", "target_speed"]
    assert find("presets", "target_ratio") == packaged("presets", "target_ratio.json")
    seed_path = ROOT / "exp" / "h2o_v2" / "configs" / "target_ratio.json"
    assert seed_path.resolve() == packaged("presets", "target_ratio").resolve()
    assert find("configs", str(seed_path)) == seed_path


def test_python_m_h2okit_and_versions():
    out = subprocess.run([sys.executable, "-m", "h2okit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("h2okit ")
    out = subprocess.run([sys.executable, "-m", "h2okit.bench", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("llm_bench (h2okit ")
