"""In-process llama.cpp backend (the default): the packaged Gemma 3 270M GGUF or any GGUF file.

Scoring evaluates prefix + continuation in one decode and asks llama.cpp for logits only at
the continuation positions, so a 262k-token vocabulary costs a few rows, not one per prompt
token. The KV cache keeps whatever prefix the last call left, so consecutive calls sharing a
few-shot prefix evaluate only what differs.

llama.cpp's CPU kernels depend on batch size, so a token's logits depend on which tokens
shared its batch. Tokens are therefore always decoded in chunks at fixed absolute positions
(multiples of ALIGN) and the cache is only ever rewound to such a boundary: a prompt gets
bit-identical logits whatever an earlier call left in the cache.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gecko.llm.base import ContinuationScore, GenerationParams, LabelScores, LLMError, label_logprobs_by_scoring
from gecko.models import DEFAULT, default_gguf_path, file_sha256

ALIGN = 64


def free_cores() -> int:
    """Cores not busy right now: llama.cpp with more threads than free cores runs ~50x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def log_softmax_at(row: np.ndarray, token: int) -> float:
    """log P(token) from one row of logits, in float64 for a stable log-sum-exp."""
    row = row.astype(np.float64, copy=False)
    top = row.max()
    return float(row[token] - top - np.log(np.exp(row - top).sum()))


class LlamaCppLLM:
    def __init__(self, model: str | Path = DEFAULT, n_ctx: int = 4096, n_threads: int | None = None):
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        path = default_gguf_path() if str(model) == DEFAULT else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        self.path = path
        self.n_threads = n_threads or int(os.environ.get("GECKO_LLM_THREADS", 0)) or free_cores()
        self.identity = f"llamacpp:{file_sha256(path)}"
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints context notes even when not verbose
            self._llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=ALIGN,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                swa_full=True,  # rolling the KV cache back to a shared prefix needs the whole window kept
                verbose=False,
            )
        self._n_vocab = self._llama.n_vocab()
        self.evaluated_tokens = 0  # tokens actually decoded: shows what prefix reuse saves
        self.tokens_in = 0  # prompt tokens of generate calls
        self.tokens_out = 0  # generated tokens

    # --- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def _piece(self, token: int) -> str:
        return self._llama.detokenize([token]).decode("utf-8", errors="replace")

    def _rewind_to_shared_prefix(self, tokens: list[int], keep_at_most: int) -> int:
        """Drop KV entries past the longest prefix shared with `tokens` (capped); return its length.

        The cap is the first position whose logits the caller needs: that token must be
        evaluated again for llama.cpp to produce its logits.
        """
        llama = self._llama
        cached = llama.input_ids[: llama.n_tokens]
        limit = min(len(cached), keep_at_most)
        shared = 0
        while shared < limit and cached[shared] == tokens[shared]:
            shared += 1
        shared -= shared % ALIGN
        llama._ctx.kv_cache_seq_rm(-1, shared, -1)
        llama.n_tokens = shared
        return shared

    def _decode(self, tokens: list[int], start: int, want_logits_from: int) -> np.ndarray:
        """Evaluate tokens[start:] after the cached tokens[:start]; logits rows for positions >= want_logits_from."""
        llama = self._llama
        rows: list[np.ndarray] = []
        lo = start
        while lo < len(tokens):
            chunk = tokens[lo : (lo // ALIGN + 1) * ALIGN]  # chunks end at absolute multiples of ALIGN
            batch = llama._batch
            batch.set_batch(batch=chunk, n_past=lo, logits_all=False)
            flags = [lo + i >= want_logits_from for i in range(len(chunk))]
            for i, flag in enumerate(flags):
                batch.batch.logits[i] = flag
            llama._ctx.decode(batch)
            self.evaluated_tokens += len(chunk)
            llama.input_ids[lo : lo + len(chunk)] = chunk
            llama.n_tokens = lo + len(chunk)
            for i, flag in enumerate(flags):
                if flag:
                    pointer = llama._ctx.get_logits_ith(i)
                    rows.append(np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,)).copy())
            lo += len(chunk)
        return np.stack(rows) if rows else np.zeros((0, self._n_vocab), dtype=np.float32)

    # --- protocol -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        texts = []
        for prompt in prompts:
            # Evaluate the prompt ourselves (aligned, logits at its last token); create_completion
            # then finds it fully cached and samples straight from those logits.
            tokens = self.tokenize(prompt, bos=True)
            start = self._rewind_to_shared_prefix(tokens, keep_at_most=len(tokens) - 1)
            self._decode(tokens, start, want_logits_from=len(tokens) - 1)
            self._llama._requires_eval = False
            out = self._llama.create_completion(
                tokens,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0 if params.temperature > 0 else 1,
                min_p=0.0,
                repeat_penalty=1.0,
                stop=list(params.stop) or None,
                seed=params.seed,
            )
            texts.append(out["choices"][0]["text"])
            self.tokens_in += len(tokens)
            self.tokens_out += out["usage"]["completion_tokens"]
        return texts

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        prefix_tokens = self.tokenize(prefix, bos=True)
        results = []
        for continuation in continuations:
            cont_tokens = self.tokenize(continuation, bos=False)
            if not cont_tokens:
                results.append(ContinuationScore([], []))
                continue
            tokens = prefix_tokens + cont_tokens
            if len(tokens) >= self._llama.n_ctx():
                raise LLMError(f"prefix + continuation is {len(tokens)} tokens, more than the context ({self._llama.n_ctx()})")
            first = len(prefix_tokens) - 1  # logits here predict the first continuation token
            start = self._rewind_to_shared_prefix(tokens, keep_at_most=first)
            rows = self._decode(tokens[: len(tokens) - 1], start, want_logits_from=first)
            # the final continuation token is never an input whose logits we need
            logprobs = [log_softmax_at(row, tok) for row, tok in zip(rows, cont_tokens)]
            results.append(ContinuationScore([self._piece(t) for t in cont_tokens], logprobs))
        return results

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        """Single-token labels: one decode, read from the full logits row; otherwise by scoring."""
        label_tokens = [self.tokenize(label, bos=False) for label in labels]
        if any(len(t) != 1 for t in label_tokens):
            return label_logprobs_by_scoring(self, prompt, labels)
        tokens = self.tokenize(prompt, bos=True)
        start = self._rewind_to_shared_prefix(tokens, keep_at_most=len(tokens) - 1)
        (row,) = self._decode(tokens, start, want_logits_from=len(tokens) - 1)
        return LabelScores({label: log_softmax_at(row, t[0]) for label, t in zip(labels, label_tokens)})

    def step_by_step_logprobs(self, prefix: str, continuation: str) -> list[float]:
        """Reference scorer for tests: one token per decode, no batching of the continuation."""
        prefix_tokens = self.tokenize(prefix, bos=True)
        cont_tokens = self.tokenize(continuation, bos=False)
        self._rewind_to_shared_prefix([], keep_at_most=0)
        (row,) = self._decode(prefix_tokens, 0, want_logits_from=len(prefix_tokens) - 1)
        out = []
        for i, tok in enumerate(cont_tokens):
            out.append(log_softmax_at(row, tok))
            tokens = prefix_tokens + cont_tokens[: i + 1]
            if i + 1 < len(cont_tokens):
                (row,) = self._decode(tokens, len(tokens) - 1, want_logits_from=len(tokens) - 1)
        return out

    def reset(self) -> None:
        """Forget the cached KV prefix (tests use it to compare reuse against no reuse)."""
        self._rewind_to_shared_prefix([], keep_at_most=0)
