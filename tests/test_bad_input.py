"""Bad input, case by case: every command answers one line naming what is wrong and what is allowed,
exit 2, never a traceback; settings that are clamped or ignored warn instead of passing silently.

The commands run in-process (their `main`), so a missed error is a pytest traceback, not a pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from h2okit import bench
from h2okit import cli as h2okit_cli
from h2okit.clikit import OneLineParser, comma_arg
from h2okit.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
SEED = json.loads((ROOT / "configs" / "smollm2-135m-seed.json").read_text())
DEFAULT = ROOT / "configs" / "smollm2-135m.json"
FAKE = ROOT / "tests" / "data" / "fake_llm_bench.py"
UNWRITABLE = "/proc/h2okit-cannot-write-here/out"  # not creatable, even as root


class Files:
    """Builds the files a case needs inside tmp_path."""

    def __init__(self, root: Path):
        self.root = root

    def config(self, **overrides) -> str:
        path = self.root / "config.json"
        path.write_text(json.dumps({**SEED, **overrides}))
        return str(path)

    def raw_config(self, text: str) -> str:
        path = self.root / "raw.json"
        path.write_text(text)
        return str(path)

    def model(self, gguf_bytes: bytes | None = None, folder_config: str | None = None) -> str:
        if gguf_bytes is not None:
            model = self.root / "m.gguf"
            model.write_bytes(gguf_bytes)
        else:
            model = self.root / "hf"
            model.mkdir()
            (model / "config.json").write_text(folder_config or "{}")
        return self.config(base_dir=str(self.root), llm_model=model.name)

    def file(self, name: str, data: bytes | str = b"") -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def folder(self, name: str, files: dict[str, str] | None = None) -> str:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            (path / rel).write_text(text)
        return str(path)

    def csv(self, rows: list[dict]) -> str:
        import pandas as pd

        path = self.root / "m.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        return str(path)

    def sweep_dir(self, manifest: str | None) -> str:
        out = self.root / "sweep"
        (out / "logs").mkdir(parents=True)
        if manifest is not None:
            (out / "manifest.json").write_text(manifest)
        return str(out)


GOOD_ROW = {"model": "m", "decode_tps_mean": 20.0, "kv_true_ratio_mean": 2.0, "log_file": "a.log",
            "kv_h2o_policy": "h2o"}
BENCH = "llm_bench"  # commands
KIT = "h2okit"


def grid_args(f: Files, *extra: str, llm_bench: str = str(FAKE)) -> list[str]:
    return ["grid", "--llm-bench", llm_bench, "--base-config", str(DEFAULT), "--out-dir",
            str(f.root / "out"), "--prompts", "64", "--gens", "4", *extra]


def preset(f: Files, content) -> list[str]:
    path = f.file("preset.json", content if isinstance(content, str) else json.dumps(content))
    return ["sweep", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--preset", path, "--out-dir",
            str(f.root / "out")]


def bench_args(config: str, *extra: str) -> list[str]:
    return ["-m", config, "-p", "16", "-n", "2", "-rep", "1", *extra]


# (id, command, argv builder, text the one error line must contain)
CASES = [
    # --- llm_bench flags --------------------------------------------------------------------------
    ("bench-no-config", BENCH, lambda f: ["-p", "8"], "-m CONFIG.json is required"),
    ("bench-config-missing", BENCH, lambda f: bench_args(str(f.root / "nope.json")), "config file not found"),
    ("bench-config-folder", BENCH, lambda f: bench_args(f.folder("cfgdir")), "is a folder, not a JSON file"),
    ("bench-config-not-json", BENCH, lambda f: bench_args(f.raw_config("{oops")), "not valid JSON"),
    ("bench-config-list", BENCH, lambda f: bench_args(f.raw_config("[1, 2]")), "must be a JSON object"),
    ("bench-config-binary", BENCH, lambda f: bench_args(f.file("bin.json", bytes(range(256)))),
     "is not a text file"),
    ("bench-backend", BENCH, lambda f: bench_args(f.config(), "-a", "gpu"), "allowed: cpu"),
    ("bench-qatten", BENCH, lambda f: bench_args(f.config(), "-qatten", "1"), "allowed: 0"),
    ("bench-kv-false", BENCH, lambda f: bench_args(f.config(), "-kv", "false"), "-kv false is not supported"),
    ("bench-kv-word", BENCH, lambda f: bench_args(f.config(), "-kv", "maybe"), "expected true or false"),
    ("bench-rep-0", BENCH, lambda f: bench_args(f.config(), "-rep", "0"), "-rep must be >= 1"),
    ("bench-rep-negative", BENCH, lambda f: ["-m", f.config(), "-rep", "-2"], "-rep must be >= 1"),
    ("bench-batch-0", BENCH, lambda f: bench_args(f.config(), "--batch", "0"), "--batch: expected positive integers"),
    ("bench-batch-not-a-number", BENCH, lambda f: bench_args(f.config(), "--batch", "four"),
     "--batch: expected a comma list of integers"),
    ("bench-batch-on-the-reference-path", BENCH,
     lambda f: bench_args(f.config(), "--batch", "1,2", "--decode-path", "reference"),
     "--batch 2 decodes on the fast path"),
    ("bench-p-0", BENCH, lambda f: ["-m", f.config(), "-p", "0"], "expected positive integers"),
    ("bench-p-negative", BENCH, lambda f: ["-m", f.config(), "-p", "-5"], "expected"),
    ("bench-p-word", BENCH, lambda f: ["-m", f.config(), "-p", "abc"], "comma list of integers"),
    ("bench-n-0", BENCH, lambda f: ["-m", f.config(), "-n", "0"], "expected positive integers"),
    ("bench-t-0", BENCH, lambda f: ["-m", f.config(), "-t", "0"], "expected positive integers"),
    ("bench-t-word", BENCH, lambda f: ["-m", f.config(), "-t", "two"], "comma list of integers"),
    ("bench-output", BENCH, lambda f: bench_args(f.config(), "-o", "xml"), "choose from 'md', 'json', 'jsonl'"),
    ("bench-decode-path", BENCH, lambda f: bench_args(f.config(), "--decode-path", "warp"), "choose from"),
    ("bench-fp-folder", BENCH, lambda f: bench_args(f.config(), "-fp", f.folder("logdir")), "is a folder"),
    ("bench-fp-unwritable", BENCH, lambda f: bench_args(f.config(), "-fp", UNWRITABLE), "cannot append"),
    ("bench-fp-under-a-file", BENCH, lambda f: bench_args(f.config(), "-fp", f.file("plain") + "/x.log"),
     "cannot append"),
    ("bench-quality-windows-0", BENCH, lambda f: bench_args(f.config(), "--quality", "--quality-windows", "0"),
     "--quality-windows must be in 1..54"),
    ("bench-quality-windows-huge", BENCH,
     lambda f: bench_args(f.config(), "--quality", "--quality-windows", "1000"), "--quality-windows must be"),
    ("bench-quality-tokens", BENCH, lambda f: bench_args(f.config(), "--quality", "--quality-tokens", "1"),
     "--quality-tokens must be >= 2"),
    ("bench-passkey-depth-range", BENCH, lambda f: bench_args(f.config(), "--quality", "--passkey-depths", "2"),
     "fractions in [0, 1]"),
    ("bench-passkey-depth-word", BENCH, lambda f: bench_args(f.config(), "--quality", "--passkey-depths", "x"),
     "comma list of fractions"),
    ("bench-unknown-flag", BENCH, lambda f: bench_args(f.config(), "--warp"), "unrecognized arguments"),
    ("bench-check-config-bad", BENCH, lambda f: ["--check-config", f.config(kv_h2o_policy="lru")],
     "config.json: config key 'kv_h2o_policy' has value \"lru\""),
    ("bench-check-config-one-of-two", BENCH,
     lambda f: ["--check-config", str(DEFAULT), f.config(kv_h2o_policy="lru")], "1 of 2 configs invalid; the first"),
    # --- config values ------------------------------------------------------------------------------
    ("cfg-unknown-key", BENCH, lambda f: bench_args(f.config(kv_h2o_sink=4)), "did you mean 'kv_h2o_sink_tokens'"),
    ("cfg-unknown-key-far", BENCH, lambda f: bench_args(f.config(kv_zzz=1)), "unknown config key 'kv_zzz'"),
    ("cfg-bool-as-string", BENCH, lambda f: bench_args(f.config(kv_h2o_enable="yes")), "must be a boolean"),
    ("cfg-int-as-float", BENCH, lambda f: bench_args(f.config(kv_h2o_block_tokens=3.5)), "must be an integer"),
    ("cfg-int-huge", BENCH, lambda f: bench_args(f.config(kv_h2o_block_tokens=2**63)), "does not fit a 32-bit"),
    ("cfg-int-huge-negative", BENCH, lambda f: bench_args(f.config(kv_h2o_sink_tokens=-(2**40))),
     "does not fit a 32-bit"),
    ("cfg-nan-ratio", BENCH, lambda f: bench_args(f.raw_config('{"kv_h2o_target_keep_ratio": NaN}')),
     "must be a finite number"),
    ("cfg-inf-ratio", BENCH, lambda f: bench_args(f.raw_config('{"kv_h2o_target_keep_ratio": Infinity}')),
     "must be a finite number"),
    ("cfg-inf-lossy", BENCH, lambda f: bench_args(f.raw_config('{"kv_h2o_target_lossy_ratio": Infinity}')),
     "must be a finite number"),
    ("cfg-neg-inf-alpha", BENCH, lambda f: bench_args(f.raw_config('{"kv_h2o_ema_alpha": -Infinity}')),
     "must be a finite number"),
    ("cfg-mode", BENCH, lambda f: bench_args(f.config(kv_h2o_target_mode="both")), "allowed: static, adaptive"),
    ("cfg-policy", BENCH, lambda f: bench_args(f.config(kv_h2o_policy="lru")), "allowed: h2o, tova"),
    ("cfg-basis", BENCH, lambda f: bench_args(f.config(kv_h2o_budget_basis="all")), "allowed: current, seen"),
    ("cfg-basis-tokens-without-count", BENCH, lambda f: bench_args(f.config(kv_h2o_budget_basis="tokens")),
     "kv_h2o_budget_tokens' must be >= 1"),
    ("cfg-score-pool-even", BENCH, lambda f: bench_args(f.config(kv_h2o_score_pool=4)),
     "kv_h2o_score_pool' must be odd"),
    ("cfg-codec", BENCH, lambda f: bench_args(f.config(kv_lossless_codec="lz4")), "allowed: none, gear_delta"),
    ("cfg-scope", BENCH, lambda f: bench_args(f.config(kv_lossless_scope="all")), "allowed: none, front_n"),
    ("cfg-runtime-mode", BENCH, lambda f: bench_args(f.config(kv_lossless_runtime_mode="fast")),
     "allowed: estimate, full, store"),
    ("cfg-cache-dtype", BENCH, lambda f: bench_args(f.config(kv_cache_dtype="int8")), "allowed: float32"),
    ("cfg-precision", BENCH, lambda f: bench_args(f.config(precision="ultra")), "allowed: normal, high, low"),
    ("cfg-weight-dtype", BENCH, lambda f: bench_args(f.config(llm_weight_dtype="int4")),
     "allowed: auto, q4_1, q8_0, bf16, fp32"),
    ("cfg-activation-dtype", BENCH, lambda f: bench_args(f.config(llm_activation_dtype="int4")),
     "allowed: fp32, q8"),
    ("cfg-backend-type", BENCH, lambda f: bench_args(f.config(backend_type="cuda")), "allowed: cpu"),
    ("cfg-thread-num-string", BENCH, lambda f: bench_args(f.config(thread_num="two")), "must be an integer"),
    ("cfg-base-dir-number", BENCH, lambda f: bench_args(f.config(base_dir=5)), "must be a string"),
    ("cfg-alpha-string", BENCH, lambda f: bench_args(f.config(kv_h2o_ema_alpha="0.9")), "must be a number"),
    ("cfg-null", BENCH, lambda f: bench_args(f.config(kv_h2o_layer_start=None)), "must be an integer, got null"),
    ("cfg-slope-string", BENCH, lambda f: bench_args(f.config(kv_h2o_layer_budget_slope="up")), "must be a number"),
    # --- model files --------------------------------------------------------------------------------
    ("model-missing", BENCH, lambda f: bench_args(f.config(llm_model="missing.gguf")), "model not found"),
    ("model-not-gguf", BENCH,
     lambda f: bench_args(f.config(base_dir=str(f.root), llm_model=Path(f.file("m.txt", "hi")).name)),
     "is not a .gguf"),
    ("model-folder-without-config", BENCH,
     lambda f: bench_args(f.config(base_dir=str(f.root), llm_model=Path(f.folder("empty")).name)),
     "has no config.json"),
    ("model-pkg-missing", BENCH, lambda f: bench_args(f.config(base_dir="pkg:no_such_model_pkg")),
     "is not installed"),
    ("model-empty-gguf", BENCH, lambda f: bench_args(f.model(b"")), "is empty"),
    ("model-random-gguf", BENCH, lambda f: bench_args(f.model(os.urandom(4096))), "no GGUF magic"),
    ("model-truncated-gguf", BENCH,
     lambda f: bench_args(f.model(b"GGUF\x03\x00\x00\x00" + bytes(40))),
     "could not be read as a GGUF model"),
    ("model-folder-config-empty", BENCH, lambda f: bench_args(f.model(folder_config="{}")), "could not be loaded"),
    ("model-folder-config-garbage", BENCH, lambda f: bench_args(f.model(folder_config="{garbage")),
     "could not be loaded"),
    ("bench-corpus-missing", BENCH, lambda f: bench_args(f.config(), "--corpus", str(f.root / "none.txt")),
     "text source not found"),
    ("bench-corpus-empty-folder", BENCH, lambda f: bench_args(f.config(), "--corpus", f.folder("texts")),
     "has no .txt files"),
    # --- the kit: grid --------------------------------------------------------------------------------
    ("grid-prompts-nonpositive", KIT, lambda f: grid_args(f, "--prompts", "0,-5"), "prompts must be positive"),
    ("grid-gens-word", KIT, lambda f: grid_args(f, "--gens", "x"), "--gens must be a comma list of ints"),
    ("grid-threads-0", KIT, lambda f: grid_args(f, "--threads", "0"), "threads must be positive"),
    ("grid-keep-empty", KIT, lambda f: grid_args(f, "--h2o-keep-ratios", ","), "--h2o-keep-ratios is empty"),
    ("grid-keep-words", KIT, lambda f: grid_args(f, "--h2o-keep-ratios", "a,b"), "comma list of floats"),
    ("grid-keep-out-of-range", KIT,
     lambda f: grid_args(f, "--h2o-target-mode", "static", "--h2o-keep-ratios", "0.3,2,-1", llm_bench="llm_bench"),
     "is out of range"),
    ("grid-mode-unknown", KIT, lambda f: grid_args(f, "--h2o-target-mode", "fast", llm_bench="llm_bench"),
     "allowed: static, adaptive"),
    ("grid-repeat-0", KIT, lambda f: grid_args(f, "--repeat", "0"), "--repeat must be >= 1"),
    ("grid-llm-bench-missing", KIT, lambda f: grid_args(f, llm_bench=str(f.root / "nope")), "llm_bench not found"),
    ("grid-llm-bench-folder", KIT, lambda f: grid_args(f, llm_bench=f.folder("bin")), "is a folder"),
    ("grid-llm-bench-not-executable", KIT, lambda f: grid_args(f, llm_bench=f.file("bench.sh", "#!/bin/sh")),
     "is not executable"),
    ("grid-base-config-missing", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(f.root / "x.json"), "--out-dir",
                str(f.root / "o")], "base config not found"),
    ("grid-base-config-not-json", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", f.raw_config("nope"), "--out-dir",
                str(f.root / "o")], "is not valid JSON"),
    ("grid-base-config-list", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", f.raw_config("[]"), "--out-dir",
                str(f.root / "o")], "must be a JSON object"),
    ("grid-base-config-base-dir-number", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", f.raw_config('{"base_dir": 3}'), "--out-dir",
                str(f.root / "o")], "base_dir must be a string"),
    ("grid-out-dir-is-file", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--out-dir", f.file("o.txt")],
     "is a file"),
    ("grid-out-dir-not-empty", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--out-dir",
                f.folder("used", {"x.txt": "1"})], "is not empty"),
    ("grid-resume-corrupt-manifest", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--resume", "--out-dir",
                f.sweep_dir("{corrupt")], "not a manifest h2okit can continue"),
    ("grid-resume-list-manifest", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--resume", "--out-dir",
                f.sweep_dir("[]")], "not a manifest h2okit can continue"),
    ("grid-resume-no-manifest", KIT,
     lambda f: ["grid", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--resume", "--out-dir",
                f.sweep_dir(None)], "has no manifest.json"),
    ("grid-quality-foreign", KIT, lambda f: grid_args(f, "--quality"), "quality columns need h2okit's own"),
    ("grid-unknown-flag", KIT, lambda f: grid_args(f, "--warp"), "unrecognized arguments"),
    # --- the kit: sweep presets --------------------------------------------------------------------------
    ("sweep-preset-missing", KIT,
     lambda f: ["sweep", "--llm-bench", str(FAKE), "--base-config", str(DEFAULT), "--preset",
                str(f.root / "p.json"), "--out-dir", str(f.root / "o")], "preset not found"),
    ("sweep-preset-not-json", KIT, lambda f: preset(f, "{nope"), "is not valid JSON"),
    ("sweep-preset-list", KIT, lambda f: preset(f, [1]), "must be a JSON object"),
    ("sweep-preset-unknown-key", KIT, lambda f: preset(f, {"h2o_keep_ratio": [0.3]}),
     "unknown preset key 'h2o_keep_ratio'"),
    ("sweep-preset-empty-list", KIT, lambda f: preset(f, {"prompts": []}), "is an empty list"),
    ("sweep-preset-wrong-type", KIT, lambda f: preset(f, {"prompts": ["a"]}), "must hold int values"),
    ("sweep-preset-repeat-type", KIT, lambda f: preset(f, {"repeat": "3"}), "must be a int"),
    ("sweep-threads-0", KIT, lambda f: preset(f, {"prompts": [64]}) + ["--threads", "0"],
     "threads must be positive"),
    # --- the kit: parse ----------------------------------------------------------------------------------
    ("parse-log-dir-missing", KIT, lambda f: ["parse", "--log-dir", str(f.root / "none"), "--out-csv",
                                              str(f.root / "m.csv")], "log dir not found"),
    ("parse-log-file-missing", KIT, lambda f: ["parse", "--log-files", str(f.root / "a.log"), "--out-csv",
                                               str(f.root / "m.csv")], "log file not found"),
    ("parse-no-tables", KIT, lambda f: ["parse", "--log-files", f.file("a.log", "no table here"), "--out-csv",
                                        str(f.root / "m.csv")], "no llm_bench table rows"),
    ("parse-nothing-given", KIT, lambda f: ["parse", "--out-csv", str(f.root / "m.csv")], "no log files"),
    ("parse-out-csv-folder", KIT,
     lambda f: ["parse", "--log-files", str(ROOT / "tests" / "data" / "mnn_bench.log"), "--out-csv",
                f.folder("csvdir")], "is a folder"),
    ("parse-out-csv-unwritable", KIT,
     lambda f: ["parse", "--log-files", str(ROOT / "tests" / "data" / "mnn_bench.log"), "--out-csv", UNWRITABLE],
     "cannot write"),
    # --- the kit: analyze --------------------------------------------------------------------------------
    ("analyze-csv-missing", KIT, lambda f: ["analyze", "--csv", str(f.root / "x.csv"), "--out",
                                            str(f.root / "s.md")], "CSV not found"),
    ("analyze-csv-folder", KIT, lambda f: ["analyze", "--csv", f.folder("c"), "--out", str(f.root / "s.md")],
     "is a folder"),
    ("analyze-csv-binary", KIT, lambda f: ["analyze", "--csv", f.file("b.csv", bytes(range(256)) * 4), "--out",
                                           str(f.root / "s.md")], "not a readable CSV"),
    ("analyze-csv-empty", KIT, lambda f: ["analyze", "--csv", f.file("e.csv", ""), "--out", str(f.root / "s.md")],
     "not a readable CSV"),
    ("analyze-csv-no-speed", KIT, lambda f: ["analyze", "--csv", f.csv([{"model": "m", "log_file": "a"}]),
                                             "--out", str(f.root / "s.md")], "neither decode_tps_mean nor speed"),
    ("analyze-csv-no-ratio", KIT, lambda f: ["analyze", "--csv", f.csv([{"decode_tps_mean": 1.0, "log_file": "a"}]),
                                             "--out", str(f.root / "s.md")], "neither kv_true_ratio"),
    ("analyze-baseline-word", KIT, lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"),
                                              "--decode-baseline", "fast"], "tok/s or 'auto'"),
    ("analyze-baseline-negative", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--decode-baseline", "-5"],
     "must be a positive tok/s"),
    ("analyze-baseline-auto-no-full", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--decode-baseline", "auto"],
     "needs a run with kv_h2o_policy full"),
    ("analyze-drop-out-of-range", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--max-decode-drop", "1.5"],
     "must be a fraction in [0, 1)"),
    ("analyze-offline-not-json", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--offline-lossless-json",
                f.file("o.json", "not json")], "is not JSON"),
    ("analyze-offline-no-key", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--offline-lossless-json",
                f.file("o.json", "{}")], "has no weighted_lossless_ratio"),
    ("analyze-offline-missing", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", str(f.root / "s.md"), "--offline-lossless-json",
                str(f.root / "none.json")], "cannot read"),
    ("analyze-out-unwritable", KIT, lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", UNWRITABLE],
     "cannot write the summary"),
    ("analyze-out-under-a-file", KIT,
     lambda f: ["analyze", "--csv", f.csv([GOOD_ROW]), "--out", f.file("plain") + "/s.md"],
     "cannot write the summary"),
    # --- h2okit's other commands ---------------------------------------------------------------------------
    ("h2okit-unknown-command", KIT, lambda f: ["explode"], "invalid choice: 'explode'"),
    ("h2okit-offline-missing-dump", KIT, lambda f: ["offline-lossless", "--dump-dir", str(f.root / "none")],
     "dump"),
    ("h2okit-dump-kv-bad-config", KIT,
     lambda f: ["dump-kv", "--config", f.config(kv_h2o_policy="lru"), "--out-dir", str(f.root / "d")],
     "allowed: h2o"),
]


def run(command: str, argv: list[str]) -> int:
    try:
        return (bench.main if command == BENCH else h2okit_cli.main)(argv)
    except SystemExit as exc:  # argparse's own exit (the error line is already printed)
        return int(exc.code or 0)


@pytest.mark.parametrize("case_id, command, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case_id, command, build, expected, tmp_path, capsys):
    argv = build(Files(tmp_path))
    code = run(command, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, f"{case_id}: exit {code}\n{err}"
    assert "Traceback" not in err
    assert len(errors) == 1, f"{case_id}: expected one error line, got:\n{err}"
    assert expected in errors[0], f"{case_id}: {errors[0]!r} lacks {expected!r}"


def test_there_are_more_than_a_hundred_cases():
    assert len(CASES) + len(WARN_CASES) >= 100


# Settings that are clamped or ignored: accepted, with one warning naming the setting and the value used.
WARN_CASES = [
    ("thread_num-0", {"thread_num": 0}, "'thread_num' = 0 is out of range; using 1"),
    ("block-0", {"kv_h2o_block_tokens": 0}, "'kv_h2o_block_tokens' = 0 is out of range; using 1"),
    ("keep-above-1", {"kv_h2o_target_keep_ratio": 1.5}, "using 1.0"),
    ("keep-negative", {"kv_h2o_target_keep_ratio": -0.5}, "using 0.0"),
    ("lossy-below-1", {"kv_h2o_target_lossy_ratio": 0.5}, "using 1.0"),
    ("alpha-above-1", {"kv_h2o_ema_alpha": 2.0}, "using 1.0"),
    ("interval-0", {"kv_h2o_update_interval": 0}, "using 1"),
    ("trigger-0", {"kv_h2o_trigger_min_tokens": 0}, "using 1"),
    ("sink-negative", {"kv_h2o_sink_tokens": -4}, "using 0"),
    ("layer-start-negative", {"kv_h2o_layer_start": -3}, "using 0"),
    ("end-before-start", {"kv_h2o_layer_start": 10, "kv_h2o_layer_end": 3}, "evicts in no layer"),
    ("floors-exceed-budget", {"kv_h2o_sink_tokens": 200, "kv_h2o_recent_tokens": 300},
     "more than the 128-token budget at the trigger"),
    ("unknown-model-key", {"sampler_type": "greedy"}, "'sampler_type' is not used by h2okit; ignored"),
    ("slope-above-1", {"kv_h2o_layer_budget_slope": 3.0}, "using 1.0"),
    ("front-n-negative", {"kv_lossless_front_n": -1}, "using 0"),
    ("query-window-0", {"kv_h2o_query_window": 0}, "'kv_h2o_query_window' = 0 is out of range; using 1"),
    ("query-horizon-negative", {"kv_h2o_query_horizon": -8}, "'kv_h2o_query_horizon' = -8 is out of range; using 0"),
]


@pytest.mark.parametrize("case_id, overrides, expected", WARN_CASES, ids=[c[0] for c in WARN_CASES])
def test_clamped_or_ignored_settings_warn(case_id, overrides, expected):
    warnings = parse_config({**SEED, **overrides}).warnings
    assert any(expected in w for w in warnings), warnings


@pytest.mark.parametrize("overrides, expected", [
    ({"kv_h2o_layer_start": 40}, "kv_h2o_layer_start 40 is beyond the model's 30 layers; using 29"),
    ({"kv_h2o_layer_end": 99}, "kv_h2o_layer_end 99 is beyond the model's 30 layers; using 29"),
    ({"kv_lossless_front_n": 1000}, "kv_lossless_front_n 1000 is more than the model's 30 layers"),
])
def test_settings_beyond_the_model_warn(overrides, expected):
    assert any(expected in w for w in parse_config({**SEED, **overrides}).kv.layer_warnings(30))


def test_llm_bench_never_installs_a_missing_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("H2OKIT_CACHE", str(tmp_path / "empty-cache"))
    code = run(BENCH, bench_args(Files(tmp_path).config()))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run `h2okit prepare` once" in err
    assert not (tmp_path / "empty-cache" / "corpus").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--batch", "4,x", "argument --batch: the value must be a comma list of ints, got '4,x'"),
    ("--batch", ",", "argument --batch: the value is empty; give a comma list"),
    ("--weights", "fp32,int3", "argument --weights: unknown int3; allowed: fp32, bf16")])
def test_a_bad_comma_list_flag_is_one_line_and_exit_2(capsys, flag, value, message):
    parser = OneLineParser(prog="prog")
    parser.add_argument("--batch", default="1,8", type=comma_arg(int))
    parser.add_argument("--weights", default="fp32", type=comma_arg(str, ("fp32", "bf16")))
    assert parser.parse_args([]).batch == [1, 8]
    assert parser.parse_args(["--batch", " 2, 16 "]).batch == [2, 16]
    assert parser.parse_args(["--weights", "bf16,fp32"]).weights == ["bf16", "fp32"]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"prog: error: {message}\n"
