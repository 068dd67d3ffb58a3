"""In-process llama.cpp backend (the default): the packaged Gemma 3 270M GGUF or any GGUF file.

Scoring evaluates prefix + continuation in one decode and asks llama.cpp for logits only at
the continuation positions, so a 262k-token vocabulary costs a few rows, not one per prompt
token. The KV cache keeps whatever prefix the last call left, so consecutive calls sharing a
few-shot prefix evaluate only what differs.

llama.cpp's CPU kernels depend on batch size, so a token's logits depend on which tokens
shared its batch. Prompts are therefore always decoded in chunks at fixed absolute positions
(multiples of ALIGN) and the cache is only ever rewound to such a boundary: a prompt gets
bit-identical logits whatever an earlier call left in the cache.

`generate` decodes a batch of prompts together: their shared prefix is evaluated once and
copied to one KV sequence per prompt, then every step samples one token for each live
sequence in a single decode. Each prompt's first token depends only on that prompt; later
tokens can differ in the last bits with the batch they were decoded in (see above).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gecko.llm.base import (
    ContinuationScore, GenerationParams, JointRequest, JointScore, LabelScores, LLMError, label_logprobs_by_scoring,
    llm_threads, score_and_label_by_parts,
)
from gecko.llm.sampling import prompt_seed, sample_rows
from gecko.models import DEFAULT, default_gguf_path, file_sha256

ALIGN = 64
MAIN = 0  # the KV sequence that scoring uses and that holds the shared prefix


def log_softmax_at(row: np.ndarray, token: int) -> float:
    """log P(token) from one row of logits.

    The exponentials stay float32 (11x faster than float64 over a 262k vocabulary: 0.33 vs
    3.7 ms a row, which dominated relabel scoring) and are summed in float64.
    """
    top = row.max()
    return float(row[token]) - float(top) - math.log(float(np.exp(row - top).sum(dtype=np.float64)))


class LlamaCppLLM:
    def __init__(self, model: str | Path = DEFAULT, n_ctx: int = 8192, n_threads: int | None = None,
                 max_batch: int = 8):
        import llama_cpp
        from llama_cpp import Llama, _internals
        from llama_cpp._utils import suppress_stdout_stderr

        path = default_gguf_path() if str(model) == DEFAULT else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        self.path = path
        self.n_threads = llm_threads(n_threads)
        self.max_batch = max_batch
        self.identity = f"llamacpp:{file_sha256(path)}"
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints context notes even when not verbose
            # Llama loads the weights and tokenizer; its own context stays tiny and unused.
            self._llama = Llama(model_path=str(path), n_ctx=ALIGN, n_batch=ALIGN, n_threads=1, verbose=False)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_batch = params.n_ubatch = ALIGN * max(1, max_batch)
            params.n_seq_max = max_batch + 1  # MAIN plus one sequence per prompt of a batch
            params.n_threads = params.n_threads_batch = self.n_threads
            params.kv_unified = True  # the prompts of a batch share the cells of their common prefix
            params.swa_full = True  # rolling the KV cache back to a shared prefix needs the whole window kept
            self._ctx = _internals.LlamaContext(model=self._llama._model, params=params, verbose=False)
            self._batch = _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._batch_size = params.n_batch
        self._n_ctx = n_ctx
        self._n_vocab = self._llama.n_vocab()
        self._eos = {self._llama.token_eos(), *self._end_of_turn()}
        self._main: list[int] = []  # tokens held by the MAIN sequence
        self.evaluated_tokens = 0  # tokens actually decoded: shows what prefix reuse saves
        self.tokens_in = 0  # prompt tokens of every call (what an API would bill), not what prefix reuse evaluates
        self.tokens_out = 0  # generated tokens

    def _end_of_turn(self) -> list[int]:
        ids = self._llama.tokenize(b"<end_of_turn>", add_bos=False, special=True)
        return ids if len(ids) == 1 else []

    # --- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def _piece(self, token: int) -> str:
        return self._llama.detokenize([token]).decode("utf-8", errors="replace")

    def _text(self, tokens: list[int]) -> str:
        return self._llama.detokenize(tokens).decode("utf-8", errors="replace")

    # --- KV cache -----------------------------------------------------------------------
    def _rewind_to_shared_prefix(self, tokens: list[int], keep_at_most: int) -> int:
        """Drop MAIN's KV past the longest aligned prefix shared with `tokens` (capped); return it.

        The cap is the first position whose logits the caller needs: that token must be
        evaluated again for llama.cpp to produce its logits.
        """
        limit = min(len(self._main), keep_at_most)
        shared = 0
        while shared < limit and self._main[shared] == tokens[shared]:
            shared += 1
        shared -= shared % ALIGN
        self._ctx.kv_cache_seq_rm(MAIN, shared, -1)
        del self._main[shared:]
        return shared

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """One llama_decode of (token, position, sequence, want_logits) entries; the wanted logits rows."""
        batch = self._batch.batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, want
            batch.seq_id[i][0], batch.n_seq_id[i] = seq, 1
        self._ctx.decode(self._batch)
        self.evaluated_tokens += len(entries)
        rows = []
        for i, entry in enumerate(entries):
            if entry[3]:
                pointer = ctypes.cast(self._ctx.get_logits_ith(i), ctypes.POINTER(ctypes.c_float))
                rows.append(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())
        return rows

    def _decode(self, tokens: list[int], start: int, want_logits_from: int, seq: int = MAIN) -> np.ndarray:
        """Evaluate tokens[start:] after the cached tokens[:start]; logits rows for positions >= want_logits_from.

        Chunks end at absolute multiples of ALIGN, so a prompt's logits never depend on `start`.
        """
        rows: list[np.ndarray] = []
        lo = start
        while lo < len(tokens):
            hi = min(len(tokens), (lo // ALIGN + 1) * ALIGN)
            rows += self._run([(tokens[p], p, seq, p >= want_logits_from) for p in range(lo, hi)])
            if seq == MAIN:
                self._main[lo:hi] = tokens[lo:hi]
            lo = hi
        return np.stack(rows) if rows else np.zeros((0, self._n_vocab), dtype=np.float32)

    def _check_length(self, n: int) -> None:
        if n >= self._n_ctx:
            raise LLMError(f"{n} tokens do not fit the context of {self._n_ctx} tokens")

    # --- protocol -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        prompts = list(prompts)
        texts: list[str] = []
        for lo in range(0, len(prompts), self.max_batch):
            texts += self._generate_batch(prompts[lo : lo + self.max_batch], params)
        return texts

    def _generate_batch(self, prompts: list[str], params: GenerationParams) -> list[str]:
        encoded = [self.tokenize(p, bos=True) for p in prompts]
        for tokens in encoded:
            self._check_length(len(tokens) + params.max_tokens)
        # MAIN keeps the longest prefix common to all prompts; each prompt continues in its own sequence
        common = len(os.path.commonprefix(encoded)) if len(encoded) > 1 else len(encoded[0]) - 1
        common = min(common, min(len(t) for t in encoded) - 1)
        shared = self._rewind_to_shared_prefix(encoded[0], keep_at_most=common)
        self._decode(encoded[0][: common - common % ALIGN], shared, want_logits_from=len(encoded[0]))
        base = len(self._main)
        seqs = list(range(1, len(prompts) + 1))
        rows = []
        for seq, tokens in zip(seqs, encoded):
            self._ctx.kv_cache_seq_rm(seq, -1, -1)
            self._ctx.kv_cache_seq_cp(MAIN, seq, 0, base)
            rows.append(self._decode(tokens, base, want_logits_from=len(tokens) - 1, seq=seq)[-1])
        rngs = [np.random.default_rng(prompt_seed(params.seed, p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        live = list(range(len(prompts)))
        while live:
            step = []
            drawn = sample_rows(torch.from_numpy(np.stack([rows[i] for i in live])), params.temperature, params.top_p, [rngs[i] for i in live])
            for i, token in zip(list(live), drawn):
                if token in self._eos:
                    live.remove(i)
                    continue
                outputs[i].append(token)
                texts[i] = self._text(outputs[i])
                cut = min((texts[i].find(s) for s in params.stop if s in texts[i]), default=-1)
                if cut >= 0 or len(outputs[i]) >= params.max_tokens:
                    texts[i] = texts[i][:cut] if cut >= 0 else texts[i]
                    live.remove(i)
                    continue
                step.append((i, token))
            if step:
                fresh = self._run([(tok, len(encoded[i]) + len(outputs[i]) - 1, seqs[i], True) for i, tok in step])
                for (i, _), row in zip(step, fresh):
                    rows[i] = row
        for seq in seqs:
            self._ctx.kv_cache_seq_rm(seq, -1, -1)
        self.tokens_in += sum(len(t) for t in encoded)
        self.tokens_out += sum(len(o) for o in outputs)
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
            self._check_length(len(tokens))
            self.tokens_in += len(tokens)
            first = len(prefix_tokens) - 1  # logits here predict the first continuation token
            start = self._rewind_to_shared_prefix(tokens, keep_at_most=first)
            # the final continuation token is never an input whose logits we need
            rows = self._decode(tokens[:-1], start, want_logits_from=first)
            logprobs = [log_softmax_at(row, tok) for row, tok in zip(rows, cont_tokens)]
            results.append(ContinuationScore([self._piece(t) for t in cont_tokens], logprobs))
        return results

    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        """Single-token labels: one decode, read from the full logits row; otherwise by scoring."""
        label_tokens = [self.tokenize(label, bos=False) for label in labels]
        if any(len(t) != 1 for t in label_tokens):
            return label_logprobs_by_scoring(self, prompt, labels)
        tokens = self.tokenize(prompt, bos=True)
        self._check_length(len(tokens))
        self.tokens_in += len(tokens)
        start = self._rewind_to_shared_prefix(tokens, keep_at_most=len(tokens) - 1)
        row = self._decode(tokens, start, want_logits_from=len(tokens) - 1)[-1]
        return LabelScores({label: log_softmax_at(row, t[0]) for label, t in zip(labels, label_tokens)})

    def score_and_label(self, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
        """QL and RC of each request from one pass over its own tokens.

        `prefix + context` is decoded once per run of requests sharing a context (aligned
        chunks, reused as in `score`); each request then decodes only its continuation and
        question, in one batch at fixed positions after that context, with logits at the
        continuation rows and the last row; the rows are dropped again for the next request.
        A request's numbers therefore depend only on its own text, not on its neighbours.
        Multi-token labels fall back to `score_and_label_by_parts`.
        """
        out: list[JointScore] = []
        base_text, base = None, []
        for r in requests:
            label_tokens = [self.tokenize(label, bos=False) for label in r.labels]
            cont = self.tokenize(r.continuation, bos=False)
            if any(len(t) != 1 for t in label_tokens) or not cont:
                out += score_and_label_by_parts(self, prefix, [r])
                continue
            if prefix + r.context != base_text:  # tokenized once per run of requests sharing a context
                base_text = prefix + r.context
                base = self.tokenize(base_text, bos=True)
            tail = cont + self.tokenize(r.question, bos=False)
            self._check_length(len(base) + len(tail))
            self.tokens_in += len(base) + len(tail)
            if self._main != base[:-1]:
                start = self._rewind_to_shared_prefix(base, keep_at_most=len(base) - 1)
                self._decode(base[:-1], start, want_logits_from=len(base))
            first = len(base) - 1  # its logits predict the first continuation token
            suffix = [base[-1]] + tail
            wanted = set(range(first, first + len(cont))) | {first + len(suffix) - 1}
            entries = [(tok, first + i, MAIN, first + i in wanted) for i, tok in enumerate(suffix)]
            rows = [row for lo in range(0, len(entries), self._batch_size) for row in self._run(entries[lo : lo + self._batch_size])]
            self._ctx.kv_cache_seq_rm(MAIN, first, -1)  # MAIN holds the context again, not this request
            logprobs = [log_softmax_at(row, tok) for row, tok in zip(rows, cont)]
            labels = {label: log_softmax_at(rows[-1], t[0]) for label, t in zip(r.labels, label_tokens)}
            out.append(JointScore(ContinuationScore([self._piece(t) for t in cont], logprobs), LabelScores(labels)))
        return out

    def step_by_step_logprobs(self, prefix: str, continuation: str) -> list[float]:
        """Reference scorer for tests: one token per decode, no batching of the continuation."""
        prefix_tokens = self.tokenize(prefix, bos=True)
        cont_tokens = self.tokenize(continuation, bos=False)
        self.reset()
        row = self._decode(prefix_tokens, 0, want_logits_from=len(prefix_tokens) - 1)[-1]
        out = []
        for i, tok in enumerate(cont_tokens):
            out.append(log_softmax_at(row, tok))
            if i + 1 < len(cont_tokens):
                (row,) = self._run([(tok, len(prefix_tokens) + i, MAIN, True)])
                self._main.append(tok)
        return out

    def reset(self) -> None:
        """Forget the cached KV prefix (tests use it to compare reuse against no reuse)."""
        self._rewind_to_shared_prefix([], keep_at_most=0)
