"""h2okit: H2O KV-cache eviction plus a lossless KV codec, an MNN-compatible llm_bench, and the kit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("h2okit")  # the one source: pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
