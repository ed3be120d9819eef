"""Make `import h2okit` work for `python3 exp/h2o_v2/<script>.py`, as the seed's Quick Start types it:
if the running Python lacks h2okit, re-run the script with the repo's .venv (made by `make setup`)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ensure_h2okit() -> None:
    try:
        import h2okit  # noqa: F401
        return
    except ImportError:
        pass
    venv = ROOT / ".venv"
    venv_python = venv / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv.resolve():  # symlinks: compare prefixes
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    sys.exit(f"{Path(sys.argv[0]).name}: error: h2okit is not installed; run `make setup` in {ROOT} first")
