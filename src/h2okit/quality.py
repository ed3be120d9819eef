"""What eviction costs in quality, measured on the real model with eviction and codec active.

- Perplexity under eviction (SPEC §10's protocol): prefill P tokens of real text with the full
  cache, then feed the next M tokens one decode step at a time (scoring, eviction and codec run
  exactly as in generation); score the steady targets, those predicted after the first eviction.
  The full-cache perplexity of the same targets is the reference (`ppl_delta_pct`), and each
  window reports the attended fraction it was measured at.
- Agreement: greedy tokens of a request against the full-cache run on the same prompt.
- Passkey: a 5-digit key at several depths of a real-text prompt, then decoded filler text
  (so that evictions happen), then the question; greedy answer checked for the key.

Full-cache references are cached on disk per model, text, lengths and KV dtype.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, replace

import numpy as np
from filelock import FileLock

from .config import KVConfig
from .corpus import DEFAULT_TOKENS, DEFAULT_WINDOWS, token_stream, tokenized_texts, window_plan
from .io import write_text_atomic
from .metrics import Agreement, delta_pct, passkey_found, perplexity, token_nll
from .paths import cache_root
from .runtime import Engine, greedy

QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class QualitySettings:
    windows: int = DEFAULT_WINDOWS  # perplexity windows (corpus.window_plan)
    tokens: int = DEFAULT_TOKENS  # M: teacher-forced tokens per window (the steady ones are scored)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_filler: int = 64  # decoded filler tokens between the prompt and the question
    passkey_answer: int = 8


def reference_kv(kv: KVConfig) -> KVConfig:
    """The full cache: no eviction, no codec (lossless, so it cannot change a token), same dtype."""
    return replace(kv, h2o_enable=False, lossless_enable=False)


class _DiskCache:
    def __init__(self, model_key: str):
        self.folder = cache_root() / "quality"
        self.model_key = model_key

    def get(self, parts: list, compute):
        path = self._path(parts)
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # a torn write: compute again
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # parallel runs needing the same reference compute it once
            if path.is_file():
                return json.loads(path.read_text())
            value = compute()
            write_text_atomic(path, json.dumps(value))
        return value

    def peek(self, parts: list):
        """The stored value, or None (nothing is computed)."""
        path = self._path(parts)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def put(self, parts: list, value):
        """Store a value computed elsewhere (e.g. several at once, in a batch); returns it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._path(parts), json.dumps(value))
        return value

    def _path(self, parts: list):
        return self.folder / f"{hashlib.sha256(json.dumps([self.model_key, *parts]).encode()).hexdigest()[:24]}.json"


@dataclass
class StreamResult:
    """One teacher-forced window: per target token, its NLL and the attended fraction of the step
    that predicted it; and the first target predicted entirely after the first eviction."""

    nll: np.ndarray  # [M] nats of continuation[i]
    attended: np.ndarray  # [M]; target 0 is predicted by the prefill (full cache: 1.0)
    steady_from: int  # targets steady_from.. are "steady" (M when nothing was ever evicted)

    def steady(self, values: np.ndarray) -> np.ndarray:
        return values[self.steady_from:] if self.steady_from < len(values) else values


def stream_nll(engine: Engine, prompt: list[int], continuation: list[int]) -> StreamResult:
    """Teacher-forced: NLL of each continuation token, fed one decode step at a time.

    Attended fraction of a step (SPEC §10): the mean over layers of (cache length before the step
    + 1) / tokens seen (a sliding-window layer attends to at most its window). A target is steady
    when the step that predicted it started after the first eviction had been applied."""
    cache = engine.new_cache()
    logits = engine.forward(cache, prompt, 0)
    m = len(continuation)
    nll, attended = np.empty(m), np.ones(m)
    steady_from = m
    for i, token in enumerate(continuation):
        nll[i] = token_nll(logits[-1:].float().numpy(), np.array([token]))[0]
        if i + 1 < m:
            position = len(prompt) + i
            if steady_from == m and cache.events.evictions:
                steady_from = i + 1  # this step (predicting target i+1) is the first after an eviction
            attended[i + 1] = float(np.mean(cache.attended_tokens())) / (position + 1)
            logits = engine.forward(cache, [token], position)
    return StreamResult(nll, attended, steady_from)


QUALITY_BATCH = 8  # windows teacher-forced together on the fast path


def stream_nll_many(engine: Engine, pairs: list[tuple[list[int], list[int]]]) -> list[StreamResult]:
    """`stream_nll` of each (prompt, continuation), QUALITY_BATCH windows at a time on the fast path
    (FastDecoder.step_batch reads the weights once per step for all of them and gives each window the
    logits it gets alone, bit for bit), else one after another."""
    if engine.fast is None or len(pairs) < 2:
        return [stream_nll(engine, prompt, continuation) for prompt, continuation in pairs]
    out = []
    for i in range(0, len(pairs), QUALITY_BATCH):
        out += _stream_nll_batch(engine, pairs[i:i + QUALITY_BATCH])
    return out


def _stream_nll_batch(engine: Engine, pairs: list[tuple[list[int], list[int]]]) -> list[StreamResult]:
    """stream_nll for several windows of one continuation length, stepped together."""
    m = len(pairs[0][1])
    if any(len(continuation) != m for _, continuation in pairs):
        raise ValueError("windows stepped together need continuations of one length")
    caches = [engine.new_cache() for _ in pairs]
    logits = [engine.forward(cache, prompt, 0)[-1:] for cache, (prompt, _) in zip(caches, pairs)]
    nll, attended = np.empty((len(pairs), m)), np.ones((len(pairs), m))
    steady_from = [m] * len(pairs)
    for i in range(m):
        for s, (_, continuation) in enumerate(pairs):
            nll[s, i] = token_nll(logits[s].float().numpy(), np.array([continuation[i]]))[0]
        if i + 1 < m:
            positions = [len(prompt) + i for prompt, _ in pairs]
            for s, cache in enumerate(caches):
                if steady_from[s] == m and cache.events.evictions:
                    steady_from[s] = i + 1
                attended[s, i + 1] = float(np.mean(cache.attended_tokens())) / (positions[s] + 1)
            step = engine.fast.step_batch(caches, [continuation[i] for _, continuation in pairs], positions)
            logits = [step[s:s + 1] for s in range(len(pairs))]
    return [StreamResult(nll[s], attended[s], steady_from[s]) for s in range(len(pairs))]


def _passkey_ok(*args) -> bool:
    return passkey_trial(*args)[0]


def _make_needle(tokenizer, key: str) -> list[int]:
    return tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)


def passkey_trial(engine: Engine, tokenizer, context: list[int], filler: list[int], depth: float, key: str,
                  answer_tokens: int) -> tuple[bool, str]:
    needle = _make_needle(tokenizer, key)
    cut = int(round(depth * len(context)))
    prompt = context[:cut] + needle + context[cut:]
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    cache = engine.new_cache()
    logits = engine.forward(cache, prompt, 0)
    position = len(prompt)
    for token in filler + question:  # decode steps: H2O scores and evicts as in generation
        logits = engine.forward(cache, [token], position)
        position += 1
    answer = []
    for _ in range(answer_tokens):
        token = greedy(logits[-1])
        answer.append(token)
        logits = engine.forward(cache, [token], position)
        position += 1
    text = tokenizer.decode(answer)
    return passkey_found(text, key), text


class QualityEvaluator:
    def __init__(self, engine: Engine, texts: dict[str, str], settings: QualitySettings = QualitySettings()):
        self.engine = engine
        # the same decode path as the engine under test: the paths agree only to float tolerance
        self.reference = Engine(engine.loaded, reference_kv(engine.kv), decode_path=engine.decode_path_used)
        self.tokenizer = engine.loaded.tokenizer
        self.texts = texts
        self.settings = settings
        loaded = engine.loaded
        # the full cache's numbers depend on everything that changes the arithmetic of a step
        self.cache = _DiskCache(f"{loaded.source}:{loaded.size_bytes}:{engine.kv.cache_dtype}:"
                                f"{next(loaded.model.parameters()).dtype}:{engine.decode_path_used}"
                                + ("" if engine.fast is None else
                                   f":{loaded.weight_dtype}:{engine.fast.activation_dtype}"))
        self.names = list(texts)
        self._tokens: dict[str, np.ndarray] | None = None

    def windows(self, p: int) -> list[list[int]]:
        """The perplexity windows of P + M tokens (corpus.window_plan: the same for every config)."""
        if self._tokens is None:
            self._tokens = tokenized_texts(self.tokenizer, self.texts)
        span = p + self.settings.tokens
        plan = window_plan({name: len(ids) for name, ids in self._tokens.items()}, span, self.settings.windows)
        return [self._tokens[name][start:start + span].tolist() for name, start in plan]

    def streams(self, p: int) -> list[tuple[np.ndarray, StreamResult]]:
        """Per window: the full cache's NLL of each target, and the engine's teacher-forced run."""
        windows = self.windows(p)
        pairs = [(ids[:p], ids[p:]) for ids in windows]
        # the full-cache numbers: stored per machine; the missing ones are computed together
        refs = [self.cache.peek(["nll", ids]) for ids in windows]
        missing = [i for i, ref in enumerate(refs) if ref is None]
        for i, run in zip(missing, stream_nll_many(self.reference, [pairs[i] for i in missing])):
            refs[i] = self.cache.put(["nll", windows[i]], run.nll.tolist())
        # Without eviction the engine computes the reference's numbers (the codec is lossless), and
        # a trigger beyond the window's length means no layer can evict (the A/A check's h2o run).
        kv = self.engine.kv
        evicting = [i for i, ids in enumerate(windows) if kv.evicting and kv.h2o_trigger_min_tokens <= len(ids)]
        runs = dict(zip(evicting, stream_nll_many(self.engine, [pairs[i] for i in evicting])))
        out = []
        for i in range(len(windows)):
            ref = np.asarray(refs[i])
            out.append((ref, runs.get(i) or StreamResult(ref, np.ones(len(ref)), len(ref))))
        return out

    def perplexity(self, p: int) -> dict[str, list[float]]:
        """Per window: ppl under eviction and with the full cache over the steady targets, the increase
        in %, and the attended fraction over the steps that predicted them."""
        out: dict[str, list[float]] = {"ppl": [], "ppl_full": [], "ppl_delta_pct": [], "attended_fraction": []}
        for ref, run in self.streams(p):
            ppl, ppl_full = perplexity(run.steady(run.nll)), perplexity(run.steady(ref))
            out["ppl"].append(ppl)
            out["ppl_full"].append(ppl_full)
            out["ppl_delta_pct"].append(delta_pct(ppl, ppl_full))
            out["attended_fraction"].append(float(run.steady(run.attended).mean()))
        out["quality_windows"] = [float(len(out["ppl"]))]
        return out

    def reference_tokens(self, prompt: list[int], n: int) -> list[int]:
        return self.cache.get(["greedy", prompt, n], lambda: self.reference.generate(prompt, n).tokens)

    def agreement(self, prompt: list[int], tokens: list[int]) -> Agreement:
        return Agreement.of(tokens, self.reference_tokens(prompt, len(tokens)))

    def passkey(self, p: int) -> dict[str, list[float]]:
        s = self.settings
        names = self.names
        context = token_stream(self.tokenizer, self.texts, p + s.passkey_filler, start_text=2 % len(names))
        rng = np.random.default_rng(1234)
        out: dict[str, list[float]] = {"passkey_acc": [], "passkey_full_acc": []}
        for depth in s.passkey_depths:
            key = str(rng.integers(10000, 100000))
            needle_len = len(_make_needle(self.tokenizer, key))
            ctx, filler = context[:p - needle_len], context[p:p + s.passkey_filler]
            ok, _ = passkey_trial(self.engine, self.tokenizer, ctx, filler, depth, key, s.passkey_answer)
            full_ok = self.cache.get(["passkey", ctx, filler, depth, key, s.passkey_answer], functools.partial(
                _passkey_ok, self.reference, self.tokenizer, ctx, filler, depth, key, s.passkey_answer))
            out[f"passkey_d{round(depth * 100):02d}"] = [float(ok)]
            out["passkey_acc"].append(float(ok))
            out["passkey_full_acc"].append(float(full_ok))
        return out

    def evaluate(self, p: int, prompt: list[int], generated: list[list[int]]) -> dict[str, list[float]]:
        """All quality columns of one llm_bench row; values are samples (windows, requests or depths)."""
        started = time.perf_counter()
        columns = self.perplexity(p)
        agreements = [self.agreement(prompt, tokens) for tokens in generated]
        columns["token_agreement"] = [a.fraction for a in agreements]
        columns["first_divergence"] = [float(a.first_divergence) for a in agreements]
        if self.settings.passkey_depths:
            columns.update(self.passkey(p))
        columns["quality_s"] = [time.perf_counter() - started]
        return columns
