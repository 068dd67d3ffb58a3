"""In-process Hugging Face transformers backend: any local causal-LM folder, or a GGUF file dequantized to float.

Tokenises exactly like the llama.cpp backend (prefix with BOS, continuation without special
tokens, special-token text taken literally) so the two score the same token sequences.
Scoring runs the decoder body over the prefix once per call, then all continuations batched
against copies of that KV cache, and applies the output layer (262k rows for Gemma 3) only at
the positions whose next token is scored: otherwise that layer dominates the cost.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from gecko.llm.base import ContinuationScore, GenerationParams, LabelScores, LLMError, label_logprobs_by_scoring
from gecko.models import DEFAULT, default_gguf_path, file_sha256, gecko_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BATCH_TOKENS = 2048  # continuation tokens per batched forward
HEAD_ROWS = 128  # output-layer rows at a time: 128 x 262k float32 logits = 128 MiB


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
    def __init__(self, model: str | Path = DEFAULT, dtype: str | None = None, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = default_gguf_path() if str(model) == DEFAULT else Path(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
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
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)
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

    # --- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, bos: bool) -> list[int]:
        """Token ids as llama.cpp makes them: special-token text such as '<bos>' stays literal."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return (self._bos + ids) if bos else ids

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exact float32 log-probabilities over the whole vocabulary for a few hidden-state rows."""
        logits = self.head(hidden).float()
        if self.softcap:  # Gemma 2 style final-logit soft-capping, as the model's own forward does
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    def _token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """log P(targets[i]) from hidden row i, HEAD_ROWS rows at a time to bound the logits' memory."""
        parts = [
            self._log_softmax(hidden[lo : lo + HEAD_ROWS]).gather(1, targets[lo : lo + HEAD_ROWS, None])[:, 0]
            for lo in range(0, len(targets), HEAD_ROWS)
        ]
        return torch.cat(parts).tolist()

    def _check_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise LLMError(f"{n} tokens, more than the context ({self.n_ctx})")

    def _score_batch(self, prefix_cache, last: torch.Tensor, conts: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of continuations after a cached prefix whose last hidden state is `last`.

        Each continuation feeds all but its last token (nothing scores what follows it), right-padded:
        causal attention keeps the real positions blind to the padding, so no mask is needed.
        """
        width = max(map(len, conts)) - 1
        rows = [last] * len(conts)
        if width > 0:
            ids = torch.tensor([c[:-1] + [self._pad] * (width + 1 - len(c)) for c in conts], device=self.device)
            cache = copy.deepcopy(prefix_cache)  # the forward appends to the cache it is given
            cache.batch_repeat_interleave(len(conts))
            hidden = self.body(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
            rows = [torch.cat([last, hidden[b, : len(c) - 1]]) for b, c in enumerate(conts)]
        targets = torch.tensor([t for c in conts for t in c], device=self.device)
        flat = self._token_logprobs(torch.cat(rows), targets)
        out = []
        for c in conts:
            out.append(flat[: len(c)])
            flat = flat[len(c) :]
        return out

    # --- protocol -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        prefix_ids = self.tokenize(prefix, bos=True)
        conts = [self.tokenize(c, bos=False) for c in continuations]
        if not prefix_ids:
            raise LLMError("empty prefix and no BOS token: nothing to predict the first token from")
        self._check_length(len(prefix_ids) + max(map(len, conts), default=0))
        out = self.body(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
        prefix_cache, last = out.past_key_values, out.last_hidden_state[0, -1:]
        results = [ContinuationScore([], []) for _ in conts]
        for batch in batches([i for i, c in enumerate(conts) if c], [len(c) for c in conts]):
            logprobs = self._score_batch(prefix_cache, last, [conts[i] for i in batch])
            for i, lp in zip(batch, logprobs):
                results[i] = ContinuationScore([self._piece(t) for t in conts[i]], lp)
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
        hidden = self.body(input_ids=torch.tensor([ids], device=self.device)).last_hidden_state[0, -1:]
        row = self._log_softmax(hidden)[0]
        return LabelScores({label: float(row[t[0]]) for label, t in zip(labels, label_ids)})

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        """One prompt at a time, reseeded each, so a text never depends on its batch-mates."""
        from transformers import GenerationConfig

        sample = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=0 if sample else None,  # as the llama.cpp backend: nucleus sampling only, no top-k cut
            eos_token_id=self.model.generation_config.eos_token_id,
            pad_token_id=self._pad,
            stop_strings=list(params.stop) or None,
        )
        texts = []
        for prompt in prompts:
            ids = self.tokenize(prompt, bos=True)
            self._check_length(len(ids) + params.max_tokens)
            torch.manual_seed(params.seed)
            inputs = torch.tensor([ids], device=self.device)
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config, tokenizer=self.tokenizer)
            text = self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            cut = min((text.find(s) for s in params.stop if s in text), default=len(text))
            texts.append(text[:cut])
        return texts
