"""In-process Hugging Face transformers backend: any local causal-LM folder, or a GGUF file dequantized to float.

Tokenises exactly like the llama.cpp backend (prefix with BOS, continuation without special
tokens, special-token text taken literally) so the two score the same token sequences.
Scoring runs the decoder body over the prefix once per call, then all continuations batched
against copies of that KV cache, and applies the output layer (262k rows for Gemma 3) only at
the positions whose next token is scored: otherwise that layer dominates the cost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gecko.llm import slots
from gecko.llm.engine import default_dtype
from gecko.llm.base import (
    ContinuationScore, GenerationParams, JointRequest, JointScore, LabelScores, LLMError, label_logprobs_by_scoring,
    llm_threads, score_and_label_by_parts,
)
from gecko.llm.sampling import prompt_seed, sample_rows
from gecko.llm.slots import SlotKV
from gecko.models import DEFAULT, default_gguf_path, file_sha256, gecko_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BATCH_TOKENS = 2048  # padded prompt tokens per batched prefill forward
PACK_TOKENS = 512  # tokens of the texts after one context packed into one forward (their masked attention grows with it)
ALIGN = 64  # the shared prefix kept as a root KV is cut to a multiple of this
HEAD_ROWS = 128  # output-layer rows at a time: 128 x 262k float32 logits = 128 MiB


@dataclass
class Prefilled:
    """The prompts one generate call prefilled, kept so a retried prompt is copied, not evaluated again."""

    root: list[int]  # the root tokens the rows start after
    kv: SlotKV
    row_of: dict[tuple[int, ...], int]  # prompt tokens -> row of `kv`
    last_hidden: dict[int, torch.Tensor]  # row -> the prompt's last hidden state


def weights_sha256(folder: Path) -> str:
    """sha256 of the weights file, or of the per-shard hashes when the weights are sharded."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def converted_gguf(path: Path, sha: str) -> Path:
    """The GGUF dequantized once into a float32 safetensors folder under gecko_home()/hf/<sha>.

    Dequantizing and building the tokenizer from GGUF takes about a minute; loading the saved
    folder takes seconds. Written to a temp dir and renamed, so a folder that exists is complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gecko_home() / "hf" / sha
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # the "gguf quantizer" only dequantized at load; without it the float weights save normally
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def batches(items: list[int], lengths: list[int]) -> list[list[int]]:
    """Consecutive groups of items whose padded size (count x longest) stays within BATCH_TOKENS."""
    groups: list[list[int]] = []
    width = 0
    for i in items:
        if groups and (len(groups[-1]) + 1) * max(width, lengths[i]) <= BATCH_TOKENS:
            groups[-1].append(i)
            width = max(width, lengths[i])
        else:
            groups.append([i])
            width = lengths[i]
    return groups


class TransformersLLM:
    def __init__(self, model: str | Path = DEFAULT, dtype: str | None = None, device: str | None = None,
                 n_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = default_gguf_path() if str(model) == DEFAULT else Path(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":  # torch's threads spin like llama.cpp's: never more than the free cores
            torch.set_num_threads(llm_threads(n_threads))
        dtype = dtype or default_dtype(self.device.type, torch.get_num_threads())
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        if path.is_file() and path.suffix == ".gguf":
            sha = file_sha256(path)
            folder = converted_gguf(path, sha)
        elif path.is_dir():
            sha, folder = weights_sha256(path), path
        else:
            raise FileNotFoundError(f"expected a model folder or a .gguf file: {path}")
        self.path, self.dtype = path, dtype
        self.identity = f"transformers:{sha}:{dtype}"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        slots.register_attention()
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True,
                                                          attn_implementation=slots.ATTENTION)
        self.model.to(self.device).eval()
        self.body = self.model.model if hasattr(self.model, "model") else self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.n_ctx = getattr(self.model.config, "max_position_embeddings", None) or 4096
        # the special tokens the tokenizer puts before text (BOS for Gemma, none for some models)
        plain = self.tokenize("a", bos=False)
        full = self.tokenizer("a").input_ids
        self._bos = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._root: SlotKV | None = None  # KV of the last shared prefix (the few-shot block), kept
        self._root_tokens: list[int] = []
        self._prefix_tokens: list[int] = []
        self._prefix_hint = 0
        self._prefilled: Prefilled | None = None  # the last generate call's prompts
        self.evaluated_tokens = 0  # tokens actually run through the model: shows what prefix reuse saves
        self.tokens_in = 0  # prompt tokens of every call (what an API would bill), not what prefix reuse evaluates
        self.tokens_out = 0  # generated tokens

    # --- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, bos: bool) -> list[int]:
        """Token ids as llama.cpp makes them: special-token text such as '<bos>' stays literal."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return (self._bos + ids) if bos else ids

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _check_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise LLMError(f"{n} tokens, more than the context ({self.n_ctx})")

    # --- shared-prefix engine (gecko.llm.slots) ----------------------------------------
    def _root_for(self, tokens: list[int], want: int) -> int:
        """Make the kept root KV hold `tokens[:want]` (`want` a multiple of ALIGN); returns `want`.

        The root is the long shared prefix (the few-shot block): slots hold positions, so the
        first `want` slots of a root that starts with them serve as they are; otherwise it is
        extended from the shared part. `want` depends only on the call's own texts, not on what
        an earlier call left, so a text is split into the same forwards in every process.
        """
        want -= want % ALIGN
        shared = 0
        limit = min(len(self._root_tokens), want)
        while shared < limit and self._root_tokens[shared] == tokens[shared]:
            shared += 1
        if shared < want:
            root = self._root.fork(1, want, shared) if self._root is not None and shared else self._new_kv(1, want)
            self._forward([tokens[shared:want]], [shared], root)
            self._root, self._root_tokens = root, tokens[:want]
        return want

    def _new_kv(self, batch: int, capacity: int) -> SlotKV:
        return SlotKV.for_model(self.model.config, batch, capacity, self.model.dtype, self.device)

    def _fork(self, upto: int, batch: int, capacity: int) -> SlotKV:
        """A `batch`-row cache starting with the root's first `upto` slots (`upto` from `_root_for`)."""
        return self._root.fork(batch, capacity, upto) if upto else self._new_kv(batch, capacity)

    def _forward(self, rows: list[list[int]], starts: list[int], kv: SlotKV) -> torch.Tensor:
        """Hidden states of each row's tokens written from its start position (right-padded)."""
        width = max(map(len, rows))
        ids = torch.tensor([r + [self._pad] * (width - len(r)) for r in rows], device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(width, device=self.device)
        self.evaluated_tokens += sum(map(len, rows))
        return slots.forward(self.body, self.model.config, ids, positions, kv)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary for a few hidden-state rows (the model's head)."""
        logits = self.head(hidden).float()
        if self.softcap:  # Gemma 2 style final-logit soft-capping, as the model's own forward does
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _logprobs_at(self, hidden: torch.Tensor, targets: list[list[int]]) -> list[list[float]]:
        """log P(t) for each token t of targets[i] from hidden row i: the head runs once over all
        rows, HEAD_ROWS at a time (one big product, not one per request; bounds the logits' memory)."""
        out: list[list[float]] = []
        for lo in range(0, len(targets), HEAD_ROWS):
            logits = self._logits(hidden[lo : lo + HEAD_ROWS])
            lse = torch.logsumexp(logits, dim=-1)
            for r, tokens in enumerate(targets[lo : lo + HEAD_ROWS]):
                out.append((logits[r, tokens] - lse[r]).tolist())
        return out

    def _after_context(self, context: list[int], tails: list[list[int]], wanted: list[list[int]]) -> list[torch.Tensor]:
        """Hidden states after `context` (BOS included) for each tail: for each tail, the rows at
        the indices `wanted[i]` of [context's last token] + tail.

        The context is evaluated once (after the root prefix); the tails follow it packed into
        one row, PACK_TOKENS at a time, each seeing the context and itself only."""
        root = self._root_for(context, min(self._root_want(context), len(context) - 1))
        longest = max(map(len, tails), default=0)
        ctx = self._fork(root, 1, len(context) + max(PACK_TOKENS, longest))
        last = self._forward([context[root:]], [root], ctx)[0, -1:]
        out: list[torch.Tensor] = [last[:0]] * len(tails)
        pack: list[int] = []
        for i in range(len(tails) + 1):
            if pack and (i == len(tails) or sum(len(tails[j]) for j in pack) + len(tails[i]) > PACK_TOKENS):
                live = [j for j in pack if tails[j]]
                hidden = slots.forward_packed(self.body, self.model.config, [tails[j] for j in live], len(context), ctx) if live else []
                self.evaluated_tokens += sum(len(tails[j]) for j in live)
                own = dict(zip(live, hidden))
                for j in pack:
                    full = torch.cat([last, own[j]]) if j in own else last
                    out[j] = full[wanted[j]]
                pack = []
            if i < len(tails):
                pack.append(i)
        return out

    def _prefill(self, encoded: list[list[int]], root: int, max_tokens: int) -> tuple[SlotKV, dict[int, torch.Tensor]]:
        """A KV with one row per prompt holding it (after the root's `root` slots) and room for
        `max_tokens` more, and each prompt's last hidden state.

        Prompts the previous call prefilled after the same root are copied from it, not
        evaluated again: a rejected answer is retried with the same prompt and another seed. The
        others run in length-sorted groups of rows, so short prompts are not padded to long ones.
        """
        own = [t[root:] for t in encoded]
        kv = self._fork(root, len(encoded), root + max(map(len, own)) + max_tokens)
        last: dict[int, torch.Tensor] = {}
        previous = self._prefilled if self._prefilled and self._prefilled.root == self._root_tokens[:root] else None
        todo = []
        for i, tokens in enumerate(encoded):
            row = previous.row_of.get(tuple(tokens)) if previous else None
            if row is None:
                todo.append(i)
                continue
            kv.copy_row(i, previous.kv, row, root, len(tokens))
            last[i] = previous.last_hidden[row]
        todo.sort(key=lambda i: len(own[i]))
        rows_of = {i: r for r, i in enumerate(todo)}
        fresh = self._fork(root, len(todo), root + max((len(own[i]) for i in todo), default=1))
        for group in batches(list(range(len(todo))), [len(own[i]) for i in todo]):
            lo, hi = group[0], group[-1] + 1
            hidden = self._forward([own[todo[r]] for r in group], [root] * len(group), fresh.rows(lo, hi))
            for r in group:
                last[todo[r]] = hidden[r - lo, len(own[todo[r]]) - 1]
        for r, i in enumerate(todo):
            kv.copy_row(i, fresh, r, root, len(encoded[i]))
        self._prefilled = Prefilled(self._root_tokens[:root], fresh, {tuple(encoded[i]): r for i, r in rows_of.items()},
                                    {r: last[i] for i, r in rows_of.items()})
        return kv, last

    def _root_want(self, tokens: list[int]) -> int:
        """The root to keep for a text: the registered few-shot prefix when the text starts with it."""
        want = self._prefix_hint
        return want if want and tokens[:want] == self._prefix_tokens else 0

    def _hint_prefix(self, prefix: str) -> None:
        """Remember the shared few-shot prefix of the coming calls (its tokens minus the last,
        which may merge with what follows it)."""
        tokens = self.tokenize(prefix, bos=True)[:-1]
        self._prefix_tokens, self._prefix_hint = tokens, len(tokens)

    def reset(self) -> None:
        """Forget every kept KV (benchmarks use it to time the naive way from the first token)."""
        self._root, self._root_tokens, self._prefilled = None, [], None

    # --- protocol -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        prefix_ids = self.tokenize(prefix, bos=True)
        conts = [self.tokenize(c, bos=False) for c in continuations]
        if not prefix_ids:
            raise LLMError("empty prefix and no BOS token: nothing to predict the first token from")
        self._check_length(len(prefix_ids) + max(map(len, conts), default=0))
        results = [ContinuationScore([], []) for _ in conts]
        todo = [i for i, c in enumerate(conts) if c]
        self.tokens_in += sum(len(prefix_ids) + len(conts[i]) for i in todo)
        if not todo:
            return results
        # feed all but each continuation's last token: nothing scores what follows it
        rows = self._after_context(prefix_ids, [conts[i][:-1] for i in todo], [list(range(len(conts[i]))) for i in todo])
        flat = self._logprobs_at(torch.cat(rows), [[t] for i in todo for t in conts[i]])
        for i in todo:
            n = len(conts[i])
            results[i], flat = ContinuationScore([self._piece(t) for t in conts[i]], [v for (v,) in flat[:n]]), flat[n:]
        return results

    @torch.inference_mode()
    def label_logprobs(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        """Single-token labels: one forward, read from the full last-position row; otherwise by scoring."""
        label_ids = [self.tokenize(label, bos=False) for label in labels]
        if any(len(t) != 1 for t in label_ids):
            return label_logprobs_by_scoring(self, prompt, labels)
        ids = self.tokenize(prompt, bos=True)
        if not ids:
            raise LLMError("empty prompt and no BOS token: nothing to predict the label from")
        self._check_length(len(ids))
        self.tokens_in += len(ids)
        (hidden,) = self._after_context(ids, [[]], [[0]])
        row = torch.log_softmax(self._logits(hidden), dim=-1)[0]
        return LabelScores({label: float(row[t[0]]) for label, t in zip(labels, label_ids)})

    @torch.inference_mode()
    def score_and_label(self, prefix: str, requests: Sequence[JointRequest]) -> list[JointScore]:
        """QL and RC of each request from one pass over its own tokens, requests sharing a context batched.

        `prefix` (the few-shot block) is evaluated once per process, each run of requests sharing a
        context once, and each request's continuation + question once, packed after the context's
        KV; the head runs only at the continuation rows and the last row.
        Multi-token labels fall back to `score_and_label_by_parts`."""
        self._hint_prefix(prefix)
        out: list[JointScore | None] = [None] * len(requests)
        runs: dict[str, list[int]] = {}
        tokens: dict[int, tuple[list[int], list[int]]] = {}  # request -> (continuation, label ids)
        for i, r in enumerate(requests):
            cont, label_ids = self.tokenize(r.continuation, bos=False), [self.tokenize(label, bos=False) for label in r.labels]
            if any(len(t) != 1 for t in label_ids) or not cont:
                out[i] = score_and_label_by_parts(self, prefix, [r])[0]
            else:
                runs.setdefault(r.context, []).append(i)
                tokens[i] = (cont, [t[0] for t in label_ids])
        for context, idx in runs.items():
            base = self.tokenize(prefix + context, bos=True)
            conts = [tokens[i][0] for i in idx]
            tails = [c + self.tokenize(requests[i].question, bos=False) for i, c in zip(idx, conts)]
            self._check_length(len(base) + max(map(len, tails)))
            self.tokens_in += sum(len(base) + len(t) for t in tails)
            wanted = [list(range(len(c))) + [len(t)] for c, t in zip(conts, tails)]
            rows = self._after_context(base, tails, wanted)
            label_ids = [tokens[i][1] for i in idx]
            # per request: one row per continuation token (its target), then the label row (every label)
            targets = [row for c, ids in zip(conts, label_ids) for row in [[t] for t in c] + [ids]]
            flat = self._logprobs_at(torch.cat(rows), targets)
            for i, cont, ids in zip(idx, conts, label_ids):
                ql, flat = [v for (v,) in flat[: len(cont)]], flat[len(cont) :]
                labels, flat = dict(zip(requests[i].labels, flat[0])), flat[1:]
                out[i] = JointScore(ContinuationScore([self._piece(t) for t in cont], ql), LabelScores(labels))
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        """All prompts decoded together after their shared prefix (evaluated once and kept).

        Each prompt samples from its own random stream (seeded by the prompt), so a text does
        not depend on its batch-mates' draws."""
        encoded = [self.tokenize(p, bos=True) for p in prompts]
        for tokens in encoded:
            if not tokens:
                raise LLMError("empty prompt and no BOS token: nothing to generate from")
            self._check_length(len(tokens) + params.max_tokens)
        if not encoded:
            return []
        kept = self._root_tokens
        if len(encoded) > 1:  # the shared part of the prompts (the few-shot block) becomes the root
            common = len(os.path.commonprefix(encoded))
        else:  # a lone prompt (a retry) keeps using a root it starts with
            common = len(kept) if kept and encoded[0][: len(kept)] == kept else 0
        root = self._root_for(encoded[0], min(common, len(encoded[0]) - 1, *(len(t) - 1 for t in encoded)))
        kv, last = self._prefill(encoded, root, params.max_tokens)
        rngs = [np.random.default_rng(prompt_seed(params.seed, p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        lengths = [len(t) for t in encoded]
        live = list(range(len(prompts)))
        order = list(live)  # the prompt held in each row of the KV
        while live:
            rows = self._logits(torch.stack([last[i] for i in live]))
            tokens = sample_rows(rows, params.temperature, params.top_p, [rngs[i] for i in live])
            still = []
            for i, token in zip(live, tokens):
                if token in self._eos:
                    continue
                outputs[i].append(token)
                texts[i] = self.tokenizer.decode(outputs[i])
                cut = min((texts[i].find(s) for s in params.stop if s in texts[i]), default=-1)
                if cut >= 0 or len(outputs[i]) >= params.max_tokens:
                    texts[i] = texts[i][:cut] if cut >= 0 else texts[i]
                    continue
                still.append(i)
            live = still
            if not live:
                break
            if len(live) <= len(order) // 2:  # drop finished rows rather than keep stepping them
                kv.keep([order.index(i) for i in live])
                order = list(live)
            # finished rows still in the KV rewrite their newest slot (never a prompt slot: `_prefill` keeps those)
            step = [[outputs[i][-1] if outputs[i] else self._pad] for i in order]
            hidden = self._forward(step, [lengths[i] + max(len(outputs[i]) - 1, 0) for i in order], kv)
            last = {i: hidden[r, 0] for r, i in enumerate(order)}
        self.tokens_in += sum(lengths)
        self.tokens_out += sum(map(len, outputs))
        return texts
