"""llama.cpp and h2okit side by side on the same GGUF and prompt (issue 15), interleaved.

    .venv/bin/python benchmarks/vs_llamacpp.py [--prompts 512,2048] [--gen 128] [--reps 3]

llama.cpp comes from the PyPI sdist of `llama-cpp-python`, which vendors it; it is not a dependency
of h2okit (building it takes ~15 min on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" .venv/bin/pip install llama-cpp-python==0.3.36

(~5 min here). On 2026-12-02 the machine reported AMX, and a `-DGGML_NATIVE=ON` build (which then
compiles ggml's AMX path) crashed in its first llama_decode; with AMX off it runs.
On a CPU without AVX-512 those flags build code it cannot run: there `CMAKE_ARGS="-DGGML_NATIVE=ON"`
(a Zen 3 EPYC with AVX2, 2026-12-03: ~15 min).

Without it the benchmark says so in one line and exits 0. Per round and prompt length, each engine
prefills P tokens of Austen and then decodes --gen tokens greedily, one after the other (never two
at once), 2 threads, flash attention off for llama.cpp; round 0 is a warm-up; medians of the rest,
and the per-round h2okit / llama.cpp ratio. h2okit runs the config's model with its decode path and
weights (`llm_weight_dtype`, default auto: the GGUF's own blocks), H2O off, and with the seed config;
each once with float32 inputs and once with int8 inputs to the quantized matrices (`--activations`;
llama.cpp itself multiplies Q4_1 blocks with inputs rounded to 8 bits).
`--weights bf16|fp32` compares float weights instead: llama.cpp reads a BF16 or F32 copy of the GGUF
(written once into the h2okit cache by `float_gguf`), h2okit the same values as its bf16 or fp32 weights.
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rounds import interleaved  # this folder: the shared schedule

from h2okit.clikit import setup_logging
from h2okit.config import ACTIVATION_DTYPES, load_config, parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.paths import cache_root
from h2okit.resources import find
from h2okit.runtime import Engine


# --weights: (the h2okit weights, the tensor type of llama.cpp's GGUF); "gguf" gives llama.cpp the file as
# shipped and h2okit the config's llm_weight_dtype (default auto: the file's own blocks)
WEIGHTS = {"gguf": (None, None), "bf16": ("bf16", "BF16"), "fp32": ("fp32", "F32")}


def float_gguf(src: Path, kind: str) -> Path:
    """A copy of the GGUF with its matrices dequantized and stored as `kind` (BF16 or F32; the 1-D norm
    weights stay F32, as llama.cpp's own converter writes them), so that llama.cpp reads the same
    values h2okit's float weights hold (h2okit dequantizes the same blocks to float32, then rounds
    to bf16). Written once into the h2okit cache (atomically), then reused."""
    import gguf

    out = cache_root() / "models" / "converted" / f"{src.stem}-{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    qtype = gguf.GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(src)
    tmp = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if kind == "BF16" else gguf.LlamaFileType.ALL_F32
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer's own
        vtype = field.types[0]
        value = int(file_type) if field.name == "general.file_type" else field.contents()
        writer.add_key_value(field.name, value, vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if data.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def llama_cpp_run(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of llama.cpp: eval the prompt, then greedy steps one token at a time."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(gen):  # the last evaluated token's logits (only that row is computed: logits_all off)
        token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
        llm.eval([token])
    return prefill, gen / (time.perf_counter() - start)


def h2okit_run(engine: Engine, prompt: list[int], gen: int) -> tuple[float, float]:
    result = engine.generate(prompt, gen)
    return result.prefill_tps, result.decode_tps


def versus(values: list[tuple[float, float]], base: list[tuple[float, float]], i: int) -> str:
    """Median of the per-round ratios of field i (0 prefill, 1 decode) to the base engine's, and the ratios."""
    ratios = [v[i] / b[i] for v, b in zip(values, base)]
    return f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="smollm2-135m-seed", help="the model, and the H2O settings of the +h2o row")
    ap.add_argument("--weights", default="gguf", choices=tuple(WEIGHTS),
                    help="gguf: the file as shipped (h2okit: the config's llm_weight_dtype); bf16 / fp32: "
                         "llama.cpp reads a float copy of the GGUF, h2okit the same values as its bf16 / fp32 "
                         "weights (its prefill computes in float32 either way)")
    ap.add_argument("--activations", default="fp32,q8",
                    help="h2okit's inputs to its quantized matrices (llm_activation_dtype), comma list of "
                         f"{', '.join(ACTIVATION_DTYPES)}: a pair of h2okit rows each (q8: with quantized weights)")
    args = ap.parse_args()
    activations = [a for a in args.activations.split(",") if a]
    if not activations or any(a not in ACTIVATION_DTYPES for a in activations):
        print(f"vs_llamacpp: error: --activations {args.activations!r}; allowed: a comma list of "
              f"{', '.join(ACTIVATION_DTYPES)}", file=sys.stderr)
        return 2
    try:
        import llama_cpp
    except ImportError:
        print("vs_llamacpp: llama-cpp-python is not installed; skipped (see this script's docstring to build it)")
        return 0
    torch.set_num_threads(args.threads)
    config = load_config(find("configs", args.config))
    path = resolve_model_path(config)
    if not path.is_file():
        print(f"vs_llamacpp: {path} is not a GGUF file; llama.cpp needs one")
        return 2
    h2okit_weights, llama_type = WEIGHTS[args.weights]
    loaded = load_model(path, weight_dtype=h2okit_weights or config.model["llm_weight_dtype"])
    llama_path = float_gguf(path, llama_type) if llama_type else path
    prompts = [int(p) for p in args.prompts.split(",")]
    llm = llama_cpp.Llama(model_path=str(llama_path), n_ctx=max(prompts) + args.gen + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, flash_attn=False, logits_all=False,
                          verbose=False)
    engines = {}
    for activation in activations:
        if activation != "fp32" and h2okit_weights is not None:  # float copies: building it would only warn
            print(f"h2okit: {h2okit_weights} weights, so no {activation} rows", file=sys.stderr)
            continue
        inputs = dataclasses.replace(loaded, activation_dtype=activation)
        fast = Engine(inputs, parse_config({}).kv)
        if activation != "fp32" and (fast.fast is None or not fast.fast.weights.quantized):
            print(f"h2okit: no quantized matrices, so no {activation} rows", file=sys.stderr)
            continue
        suffix = "" if activation == "fp32" else f", {activation} inputs"
        engines[f"h2okit fast{suffix}"] = fast
        engines[f"h2okit fast+h2o{suffix}"] = Engine(inputs, dataclasses.replace(config.kv, lossless_enable=False))
        print(f"h2okit{suffix}: {fast.decode_path_note}", file=sys.stderr)
    runs = {"llama.cpp": lambda p: llama_cpp_run(llm, p, args.gen),
            **{name: (lambda eng: lambda p: h2okit_run(eng, p, args.gen))(e) for name, e in engines.items()}}
    texts = load_texts()
    for p in prompts:
        prompt = token_stream(loaded.tokenizer, texts, p)
        samples = interleaved({name: functools.partial(run, prompt) for name, run in runs.items()}, args.reps,
                              f"P={p} ")
        print(f"\nP={p} G={args.gen}, {args.threads} threads, llama.cpp on {llama_path.name}: medians of "
              f"{args.reps} interleaved rounds")
        print("| engine | prefill tok/s | prefill vs llama.cpp (per-round pairs) | decode tok/s "
              "| decode vs llama.cpp (per-round pairs) |")
        print("|---|---:|---|---:|---|")
        for name, values in samples.items():
            print(f"| {name} | {statistics.median(v[0] for v in values):.1f} | "
                  f"{versus(values, samples['llama.cpp'], 0)} | {statistics.median(v[1] for v in values):.1f} | "
                  f"{versus(values, samples['llama.cpp'], 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
