"""Offline validation of the lossless codec on real K/V (the seed's "offline/bitstream checks").

`dump-kv` runs one request on a model and real text and writes every layer's K and V after
prefill and at the end (`[tokens, kv_heads, head_dim]`, `.npy`), with a manifest.
`offline-lossless` encodes a scope of that dump with gear_delta, verifies each round trip,
and reports real compressed sizes (`weighted_lossless_ratio` is what the kit's analyzer reads).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import codec
from .config import LOSSLESS_SCOPES, scope_layers

STAGES = ("prefill", "final")


class OfflineError(ValueError):
    """Bad dump folder or arguments; one line."""


def dump_kv(config_path: str, out_dir: Path, prompt_len: int, gen_len: int, corpus: str | None,
            threads: int | None = None) -> Path:
    import torch

    from .config import emit_warnings, load_config
    from .corpus import load_texts, token_stream
    from .lossless import to_numpy_words
    from .model import load_model, resolve_model_path
    from .runtime import Engine

    config = load_config(config_path)
    emit_warnings(config)
    torch.set_num_threads(threads or config.threads)
    loaded = load_model(resolve_model_path(config))
    prompt = token_stream(loaded.tokenizer, load_texts(corpus), prompt_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}

    def snapshot(stage: str):
        def save(cache):
            for layer in cache.layers:
                keys, values = layer.full_kv()
                for name, tensor in (("k", keys), ("v", values)):
                    words, dtype = to_numpy_words(tensor)
                    path = f"{stage}_layer{layer.layer_idx:02d}_{name}.npy"
                    np.save(out_dir / path, words)
                    files.setdefault(stage, {})[f"{layer.layer_idx}:{name}"] = path
            files.setdefault("dtype", {})[stage] = dtype
        return save

    result = Engine(loaded, config.kv).generate(prompt, gen_len, after_prefill=snapshot("prefill"),
                                                at_end=snapshot("final"))
    manifest = {
        "model": loaded.name, "prompt_tokens": prompt_len, "gen_tokens": gen_len,
        "num_layers": loaded.num_layers, "kv_heads": loaded.kv_heads, "head_dim": loaded.head_dim,
        "h2o_layers": list(config.kv.h2o_layers(loaded.num_layers)) if config.kv.evicting else [],
        "kv": config.kv.to_keys(), "dtype": files.pop("dtype"), "files": files,
        "kv_lengths_final": result.kv_lengths,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def _load_manifest(dump_dir: Path) -> dict:
    path = dump_dir / "manifest.json"
    if not path.is_file():
        raise OfflineError(f"{dump_dir} is not a KV dump (no manifest.json); make one with `h2okit dump-kv`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OfflineError(f"{path} is not valid JSON: {exc.msg}") from None


OFFLINE_SCOPES = (*LOSSLESS_SCOPES[1:], "all")


def dump_scope_layers(manifest: dict, scope: str, front_n: int) -> list[int]:
    if scope not in OFFLINE_SCOPES:
        raise OfflineError(f"unknown scope '{scope}'; allowed: {', '.join(OFFLINE_SCOPES)}")
    return sorted(scope_layers(scope, front_n, manifest.get("h2o_layers", []), manifest["num_layers"]))


def as_dtype(words: np.ndarray, stored: str, target: str) -> tuple[np.ndarray, str]:
    """Convert dumped words to the dtype to measure (float32 dumps can become fp16 or bf16)."""
    if target in ("stored", stored):
        return words, stored
    if stored != "float32":
        raise OfflineError(f"the dump holds {stored}; it can only be measured as {stored}")
    if target == "float16":
        return words.astype(np.float16), "float16"
    if target == "bfloat16":
        return codec.float32_to_bfloat16_words(words), "bfloat16"
    raise OfflineError(f"unknown dtype '{target}'; allowed: stored, float32, float16, bfloat16")


def offline_lossless(dump_dir: Path, scope: str, front_n: int, stage: str = "final",
                     dtype: str = "stored", block_tokens: int = codec.DEFAULT_BLOCK_TOKENS) -> dict:
    manifest = _load_manifest(dump_dir)
    if stage not in STAGES:
        raise OfflineError(f"unknown stage '{stage}'; allowed: {', '.join(STAGES)}")
    layers = dump_scope_layers(manifest, scope, front_n)
    if not layers:
        raise OfflineError(f"scope '{scope}' selects no layer of this dump")
    totals = {"k_raw_bytes": 0, "k_compressed_bytes": 0, "v_raw_bytes": 0, "v_compressed_bytes": 0}
    counts: dict[str, dict[str, int]] = {}
    per_layer, ratios = [], []
    encode_s = decode_s = 0.0
    measured_dtype = dtype
    for layer in layers:
        row = {"layer": layer}
        for name in ("k", "v"):
            path = dump_dir / manifest["files"][stage][f"{layer}:{name}"]
            words, measured_dtype = as_dtype(np.load(path), manifest["dtype"][stage], dtype)
            started = time.perf_counter()
            frame = codec.encode(words, measured_dtype, block_tokens=block_tokens)
            encode_s += time.perf_counter() - started
            started = time.perf_counter()
            back = codec.decode(frame).array
            decode_s += time.perf_counter() - started
            if back.tobytes() != words.tobytes():
                raise OfflineError(f"round trip of layer {layer} {name.upper()} is not bit-exact")
            totals[f"{name}_raw_bytes"] += words.nbytes
            totals[f"{name}_compressed_bytes"] += len(frame)
            ratios.append(words.nbytes / len(frame))
            row[f"{name}_ratio"] = words.nbytes / len(frame)
            for plane, by_predictor in codec.read_header(frame).predictor_counts().items():
                for predictor, count in by_predictor.items():
                    counts.setdefault(plane, {}).setdefault(predictor, 0)
                    counts[plane][predictor] += count
        per_layer.append(row)
    raw = totals["k_raw_bytes"] + totals["v_raw_bytes"]
    packed = totals["k_compressed_bytes"] + totals["v_compressed_bytes"]
    return {
        "codec": "gear_delta", "scope": scope, "front_n": front_n, "stage": stage, "dtype": measured_dtype,
        "layers": layers, "weighted_lossless_ratio": raw / packed, "lossless_ratio": float(np.mean(ratios)),
        # the names the original kit's analyzer reads: layers measured and K/V tensors (entries) in them
        "selected_layers": list(layers), "selected_entries": 2 * len(layers),
        **totals, "k_ratio": totals["k_raw_bytes"] / totals["k_compressed_bytes"],
        "v_ratio": totals["v_raw_bytes"] / totals["v_compressed_bytes"],
        "encode_mb_s": raw / 1e6 / encode_s if encode_s else None,
        "decode_mb_s": raw / 1e6 / decode_s if decode_s else None,
        "predictor_counts": counts, "per_layer": per_layer, "round_trip_verified": True,
        "source": "offline: real gear_delta frames, decoded and compared bit for bit",
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"# Offline lossless check ({report['codec']}, {report['dtype']}, scope {report['scope']}, "
        f"stage {report['stage']})", "",
        f"- weighted lossless ratio (Σraw/Σcompressed): **{report['weighted_lossless_ratio']:.4f}**",
        f"- mean per-tensor ratio: {report['lossless_ratio']:.4f}",
        f"- K: {report['k_raw_bytes']} → {report['k_compressed_bytes']} bytes ({report['k_ratio']:.4f}); "
        f"V: {report['v_raw_bytes']} → {report['v_compressed_bytes']} bytes ({report['v_ratio']:.4f})",
        f"- layers: {report['layers']}; every round trip verified bit-exact", "",
        "| layer | K ratio | V ratio |", "| --- | --- | --- |",
    ]
    lines += [f"| {r['layer']} | {r['k_ratio']:.4f} | {r['v_ratio']:.4f} |" for r in report["per_layer"]]
    lines += ["", "Predictor choices (token blocks):", "", "| plane | raw | delta | xor | mode |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {plane} | {c['raw']} | {c['delta']} | {c['xor']} | {c['mode']} |"
              for plane, c in report["predictor_counts"].items()]
    return "\n".join(lines) + "\n"
