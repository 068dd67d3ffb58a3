"""`gecko train`: the loss against a hand-written formula, data conversion, batching, a real run from
the packaged MiniLM, kill -9 + --resume, and DDP under torchrun (gloo on CPU)."""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from gecko.formats import TextFormat  # noqa: E402
from gecko.train import (  # noqa: E402
    DataSpec,
    GeckoCachedLoss,
    GeckoLoss,
    StageConfig,
    TrainConfig,
    TrainError,
    bucketed_embed,
    build_mixture,
    classification_triples,
    format_document,
    format_query,
    load_source,
    saved_prompts,
    train,
)
from gecko.train.data import Example, SourceData  # noqa: E402
from gecko.train.run import build_datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CLAIM_TASK = "Given a claim, find documents that support or refute the claim"

# Hand-checked SciFact train pairs: claim id -> the abstract it cites (qrels.train.tsv), read by eye:
# claim 2 "1 in 5 million in UK have abnormal PrP positivity." cites 13734012 "Prevalent abnormal prion
# protein in human appendixes after bovine spongiform encephalopathy ..."; claim 6 (SIDS deaths) cites
# 2613775 "Sudden infant death syndrome."; claim 9 (liver transplantation, methadone) cites 44265107
# "Liver transplantation and opioid dependence."
SCIFACT_PAIRS = [
    ("0", "31715818"), ("2", "13734012"), ("4", "22942787"), ("6", "2613775"), ("9", "44265107"), ("10", "32587939"),
    ("12", "33409100"), ("14", "641786"), ("15", "22080671"), ("17", "1606628"), ("19", "3202143"), ("21", "41493639"),
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def scifact_examples(shared_data, tmp_path_factory) -> Path:
    """A relabel-format file (task, query, positive, negative + titles) from real SciFact claims and abstracts."""
    root = shared_data / "scifact"
    queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in gzip.open(root / "queries.jsonl.gz", "rt")}
    docs = {}
    for line in gzip.open(root / "corpus.jsonl.gz", "rt"):
        doc = json.loads(line)
        docs[doc["_id"]] = doc
    qrels = collections.defaultdict(set)
    for line in (root / "qrels.train.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        qrels[qid].add(did)
    assert docs["13734012"]["title"].startswith("Prevalent abnormal prion protein in human appendixes")
    assert queries["6"].startswith("10% of sudden infant death syndrome")
    path = tmp_path_factory.mktemp("data") / "relabelled.jsonl"
    with path.open("w") as handle:
        for i, (qid, did) in enumerate(SCIFACT_PAIRS):
            assert did in qrels[qid]  # the positive is a cited abstract
            neg = SCIFACT_PAIRS[(i + 3) % len(SCIFACT_PAIRS)][1]
            assert neg not in qrels[qid]  # the negative is not
            handle.write(json.dumps({
                "id": f"q{qid}", "task_type": "fact_checking", "task": CLAIM_TASK, "query": queries[qid],
                "positive": docs[did]["text"], "positive_title": docs[did]["title"],
                "negative": docs[neg]["text"], "negative_title": docs[neg]["title"],
            }) + "\n")
    return path


# ---------------------------------------------------------------- loss


def _plain_gecko_loss(q, p, negs, *, t, same_tower, counts=None, every_rows_negatives=False):
    """The paper's loss written out term by term with Python floats."""
    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    n = len(q)
    total = 0.0
    for i in range(n):
        terms = [cos(q[i], p[j]) / t for j in range(n)]
        for j in range(n) if every_rows_negatives else [i]:
            real = len(negs) if counts is None else int(counts[j])
            terms += [cos(q[i], negs[k][j]) / t for k in range(real)]
        if same_tower:
            terms += [cos(q[i], q[j]) / t for j in range(n) if j != i]
        total += -(cos(q[i], p[i]) / t - math.log(sum(math.exp(x) for x in terms)))
    return total / n


def test_loss_matches_the_paper_formula_on_hand_made_embeddings():
    g = torch.Generator().manual_seed(0)
    q, p, n1, n2 = (torch.randn(4, 8, generator=g) for _ in range(4))
    for same_tower in (False, True):
        loss = GeckoLoss(torch.nn.Identity(), temperature=0.1, same_tower=same_tower, hard_negatives="own")
        got = float(loss.compute_loss_from_embeddings([q, p, n1, n2], None))
        assert got == pytest.approx(_plain_gecko_loss(q, p, [n1, n2], t=0.1, same_tower=same_tower), rel=1e-5)
    # rows with fewer real negatives (label = count) drop the padding from their denominator
    counts = torch.tensor([2, 0, 1, 2])
    loss = GeckoLoss(torch.nn.Identity(), temperature=0.1, negatives_in_label=True)
    got = float(loss.compute_loss_from_embeddings([q, p, n1, n2], counts))
    assert got == pytest.approx(_plain_gecko_loss(q, p, [n1, n2], t=0.1, same_tower=True, counts=counts), rel=1e-5)
    loss = GeckoLoss(torch.nn.Identity(), temperature=0.1, hard_negatives="batch", negatives_in_label=True)
    got = float(loss.compute_loss_from_embeddings([q, p, n1, n2], counts))
    assert got == pytest.approx(_plain_gecko_loss(q, p, [n1, n2], t=0.1, same_tower=True, counts=counts,
                                                  every_rows_negatives=True), rel=1e-5)


def test_listwise_term_is_kl_of_teacher_over_student_on_scored_texts():
    from gecko.train.loss import ListwiseDistillLoss

    g = torch.Generator().manual_seed(1)
    q, p, n1, c1, c2 = (torch.randn(3, 8, generator=g) for _ in range(5))
    nan = float("nan")
    # row 0: all scored; row 1: c2 is padding; row 2: one scored text only (no KL term)
    teacher = torch.tensor([[-3.0, -9.0, -5.0, -4.0], [-2.0, -6.0, -1.0, nan], [-1.0, nan, nan, nan]])
    labels = torch.cat([torch.tensor([[1.0], [1.0], [0.0]]), teacher], dim=1)
    inner = GeckoLoss(torch.nn.Identity(), temperature=0.1, negatives_in_label=True)
    loss = ListwiseDistillLoss(torch.nn.Identity(), inner, weight=0.5, teacher_temperature=2.0, negatives=1)
    got = float(loss.kl(q, [p, n1, c1, c2], teacher))

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    expected = []
    for i, texts in ((0, [p, n1, c1, c2]), (1, [p, n1, c1])):
        r = [float(x) / 2.0 for x in teacher[i, : len(texts)]]
        s = [cos(q[i], t[i]) / 0.1 for t in texts]
        pr = [math.exp(x) / sum(math.exp(y) for y in r) for x in r]
        log_q = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
        expected.append(sum(a * (math.log(a) - b) for a, b in zip(pr, log_q)))
    assert got == pytest.approx(sum(expected) / 2, rel=1e-5)
    # forward: the Gecko loss on (query, positive, negative) plus weight x that KL
    class Lookup(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["x"]}

    lookup = Lookup()
    inner = GeckoLoss(lookup, temperature=0.1, negatives_in_label=True, bucketed=False)
    loss = ListwiseDistillLoss(lookup, inner, weight=0.5, teacher_temperature=2.0, negatives=1)
    contrastive = float(inner.compute_loss_from_embeddings([q, p, n1], labels[:, 0].long()))
    total = float(loss([{"x": t} for t in (q, p, n1, c1, c2)], labels))
    assert total == pytest.approx(contrastive + 0.5 * sum(expected) / 2, rel=1e-5)


def test_same_tower_and_hard_negatives_change_the_loss_as_expected():
    # two orthogonal queries; each positive is its own query direction, so without negatives the loss is small
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = q.clone()
    t = 0.5
    plain = GeckoLoss(torch.nn.Identity(), temperature=t, same_tower=False, hard_negatives="own")
    base = float(plain.compute_loss_from_embeddings([q, p], None))
    # in-batch only: -log(e^{1/t} / (e^{1/t} + e^{0})) for both rows
    assert base == pytest.approx(math.log1p(math.exp(-1 / t)), rel=1e-6)
    # a hard negative identical to the positive direction adds e^{1/t}: the loss grows by log(2)-ish
    hard = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with_hard = float(plain.compute_loss_from_embeddings([q, p, hard], None))
    assert with_hard == pytest.approx(math.log((2 * math.exp(1 / t) + 1) / math.exp(1 / t)), rel=1e-6)
    # an orthogonal (easy) hard negative adds only e^{0}
    easy = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    with_easy = float(plain.compute_loss_from_embeddings([q, p, easy], None))
    assert base < with_easy < with_hard
    # same-tower: q_1 and q_2 are orthogonal -> adds e^{0}; make them close and it adds almost e^{1/t}
    same = GeckoLoss(torch.nn.Identity(), temperature=t, same_tower=True, hard_negatives="own")
    assert float(same.compute_loss_from_embeddings([q, p], None)) == pytest.approx(math.log((math.exp(1 / t) + 2) / math.exp(1 / t)), rel=1e-6)
    q_close = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0]])  # cos(q_1, q_2) = 0.994
    far = float(plain.compute_loss_from_embeddings([q_close, p], None))
    near = float(same.compute_loss_from_embeddings([q_close, p], None))
    assert near == pytest.approx(_plain_gecko_loss(q_close, p, [], t=t, same_tower=True), rel=1e-6)
    assert near - far > 0.5  # the other query is now a strong negative
    # own vs batch: the other row's hard negative only counts with hard_negatives="batch"
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # row 0's negative looks like q_1, row 1's like q_0
    own = GeckoLoss(torch.nn.Identity(), temperature=t, same_tower=False, hard_negatives="own")
    batch = GeckoLoss(torch.nn.Identity(), temperature=t, same_tower=False, hard_negatives="batch")
    l_own = float(own.compute_loss_from_embeddings([q, p, cross], None))
    l_batch = float(batch.compute_loss_from_embeddings([q, p, cross], None))
    assert l_own == pytest.approx(math.log((math.exp(1 / t) + 2) / math.exp(1 / t)), rel=1e-6)
    assert l_batch == pytest.approx(math.log((2 * math.exp(1 / t) + 2) / math.exp(1 / t)), rel=1e-6)


def test_batch_mode_is_sentence_transformers_mnrl_with_query_to_query():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(5, 16, generator=g) for _ in range(3))
    for same_tower in (False, True):
        ours = GeckoLoss(torch.nn.Identity(), temperature=0.05, same_tower=same_tower, hard_negatives="batch")
        directions = ("query_to_doc", "query_to_query") if same_tower else ("query_to_doc",)
        theirs = MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0, directions=directions, partition_mode="joint")
        assert float(ours.compute_loss_from_embeddings([q, p, n], None)) == pytest.approx(
            float(theirs.compute_loss_from_embeddings([q, p, n], None)), rel=1e-5)


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    from gecko.models import resolve_embedder

    model = SentenceTransformer(resolve_embedder("default"), device="cpu")
    model.max_seq_length = 64
    return model


def _features(model, columns):
    return [model.preprocess(col) for col in columns]


def test_bucketed_forward_equals_per_column_forward_and_cached_loss_matches(minilm):
    from sentence_transformers.base.losses.merged_forward import embed_columns

    minilm.eval()
    columns = [
        ["short query", "a somewhat longer query about aspirin", "q3", "what is the role of BRCA1 in DNA repair?"],
        ["title: none | text: " + "long passage " * 20, "title: x | text: short", "title: y | text: medium length text here",
         "title: z | text: " + "words " * 40],
        ["title: n | text: negative one", "title: n | text: " + "neg " * 30, "title: n | text: n3", "title: n | text: n4 n4"],
    ]
    feats = _features(minilm, columns)
    with torch.no_grad():
        ours = bucketed_embed(minilm, feats, chunk_rows=3)
        theirs = embed_columns(minilm, _features(minilm, columns))  # (fresh dicts: modules write outputs into them)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-5)
    # padding rows (label counts) are skipped and come back as zeros
    skip = torch.zeros(3, 4, dtype=torch.bool)
    skip[2, 1] = True
    with torch.no_grad():
        skipped = bucketed_embed(minilm, feats, skip=skip)
    assert torch.count_nonzero(skipped[2][1]) == 0 and torch.allclose(skipped[2][0], theirs[2][0], atol=2e-5)
    # the GradCache variant gives the same loss as the plain one
    with torch.no_grad():
        plain = GeckoLoss(minilm, temperature=0.05)(_features(minilm, columns), None)
        cached = GeckoCachedLoss(minilm, temperature=0.05, mini_batch_size=2)(_features(minilm, columns), None)
    assert float(plain) == pytest.approx(float(cached), rel=1e-4)


def test_cached_listwise_loss_equals_the_plain_one_in_value_and_gradients(minilm):
    """GradCache changes where the memory goes, not the loss: same value and parameter gradients as
    `ListwiseDistillLoss`, with a padded negative and a padded candidate (NaN scores), in 2-row mini-batches."""
    from gecko.train.loss import CachedListwiseDistillLoss, ListwiseDistillLoss

    minilm.eval()  # no dropout: both variants see the same embeddings
    columns = [
        ["aspirin and heart attacks", "BRCA1 DNA repair", "q3 about sleep", "vitamin D in winter"],
        ["title: a | text: aspirin lowers the risk of heart attacks", "title: b | text: BRCA1 repairs DNA breaks",
         "title: c | text: sleep and memory", "title: d | text: vitamin D and sunlight"],
        ["title: n | text: statins and cholesterol", "title: n | text: padding", "title: n | text: insulin", "title: n | text: iron"],
        ["title: c | text: platelets", "title: c | text: p53 and cancer", "title: c | text: padding", "title: c | text: calcium"],
    ]
    nan = float("nan")
    labels = torch.tensor([[1, -3.0, -9.0, -5.0], [0, -2.0, nan, -4.0], [1, -1.0, -6.0, nan], [1, -2.0, -3.0, -8.0]])
    settings = dict(weight=0.7, teacher_temperature=2.0, negatives=1)
    plain = ListwiseDistillLoss(minilm, GeckoLoss(minilm, temperature=0.05, negatives_in_label=True, bucketed=False), **settings)
    cached = CachedListwiseDistillLoss(minilm, temperature=0.05, negatives_in_label=True, mini_batch_size=2, **settings)
    results = []
    for loss in (plain, cached):
        minilm.zero_grad()
        value = loss(_features(minilm, columns), labels)
        value.backward()
        grads = torch.cat([p.grad.flatten() for p in minilm.parameters() if p.grad is not None])
        results.append((float(value.detach()), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)
    minilm.zero_grad()


# ---------------------------------------------------------------- data


def test_formats_and_relabel_rows(scifact_examples):
    source = load_source(DataSpec(str(scifact_examples)))
    assert source.kind == "examples" and len(source.examples) == len(SCIFACT_PAIRS)
    first = json.loads(scifact_examples.read_text().splitlines()[0])
    ex = source.examples[0]
    assert ex.anchor == f"task: {CLAIM_TASK} | query: {first['query']}"
    assert ex.positive == f"title: {first['positive_title']} | text: {first['positive']}"
    assert ex.negatives == [f"title: {first['negative_title']} | text: {first['negative']}"]
    assert format_document("x") == "title: none | text: x" and format_query("x", "t") == "task: t | query: x"


def test_plain_texts_without_prompts(scifact_examples, shared_data):
    """--no-prompts: the texts as MTEB embeds a prompt-less model, and nothing saved to prepend."""
    first = json.loads(scifact_examples.read_text().splitlines()[0])
    ex = load_source(DataSpec(str(scifact_examples)), fmt=TextFormat(prompts=False)).examples[0]
    assert ex.anchor == first["query"]
    assert ex.positive == f"{first['positive_title']} {first['positive']}"
    assert ex.negatives == [f"{first['negative_title']} {first['negative']}"]
    sts = load_source(DataSpec(str(shared_data / "stsb"), limit=20), fmt=TextFormat(prompts=False)).examples
    assert not any("task:" in text for e in sts for text in (e.anchor, e.positive))
    assert saved_prompts(False) == {} and "query" in saved_prompts()


def test_symmetric_sts_pairs(shared_data):
    source = load_source(DataSpec(str(shared_data / "stsb"), limit=200))
    assert source.kind == "sts" and source.rows == 200
    assert 0 < len(source.examples) < 200 and sum(source.dropped.values()) + len(source.examples) == 200
    ex = source.examples[0]
    assert ex.anchor.startswith("task: sentence similarity | query: ")
    assert ex.positive.startswith("task: sentence similarity | query: ")  # query format on both sides


def test_classification_becomes_triples_with_unique_ids(shared_data):
    import csv

    rows = list(csv.DictReader((shared_data / "banking77" / "train.csv").open()))[:600]
    label_of = {r["text"]: r["category"] for r in rows}
    triples = classification_triples([(r["text"], r["category"]) for r in rows], "classification", name="b77", seed=3)
    assert len(triples) == len({r["text"] for r in rows}) or len(triples) > 500
    prefix = "task: classification | query: "
    ids = []
    for t in triples:
        texts = [t.anchor, t.positive, t.negatives[0]]
        assert all(x.startswith(prefix) for x in texts)
        suffixes = {x.rsplit(" (id ", 1)[1] for x in texts}
        assert len(suffixes) == 1  # the same id on all three
        ids.append(suffixes.pop())
        raw = [x[len(prefix):].rsplit(" (id ", 1)[0] for x in texts]
        assert raw[0] != raw[1]
        assert label_of[raw[0]] == label_of[raw[1]] != label_of[raw[2]]
    assert len(set(ids)) == len(ids)  # unique per triple: no text repeats across triples
    assert len({t.anchor for t in triples}) == len(triples)


def test_mixture_weights_and_no_duplicate_text_in_a_batch(scifact_examples, shared_data):
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler, ProportionalBatchSampler
    from torch.utils.data import ConcatDataset

    sources = [
        load_source(DataSpec(str(scifact_examples), weight=3)),  # every example three times per epoch
        load_source(DataSpec(str(shared_data / "stsb"), weight=0.5, limit=120)),
        load_source(DataSpec(str(shared_data / "banking77"), limit=40)),
    ]
    mixture = build_mixture(sources, seed=0)
    assert mixture.counts() == {"relabelled": 36, "stsb": round(0.5 * len(sources[1].examples)), "banking77": 40}
    # repeats are whole passes: each relabelled example exactly three times
    assert set(collections.Counter(e.anchor for e in mixture.per_source["relabelled"]).values()) == {3}

    dataset, uses_counts, _ = build_datasets(mixture, homogeneous=False, hard_negatives="own", seed=0)
    assert uses_counts and dataset.column_names == ["anchor", "positive", "negative_1", "label"]
    sampler = NoDuplicatesBatchSampler(dataset, batch_size=8, drop_last=True, valid_label_columns=["label"],
                                       generator=torch.Generator(), seed=0)
    batches = list(sampler)
    assert len(batches) == len(dataset) // 8
    for batch in batches:
        texts = []
        for i in batch:
            row = dataset[i]
            texts += [row["anchor"], row["positive"]] + [row[f"negative_{k + 1}"] for k in range(row["label"])]
        assert len(texts) == len(set(texts)), "a text appears twice in one batch"

    # homogeneous: every batch from one source, sources drawn in proportion to their epoch share
    parts, _, _ = build_datasets(mixture, homogeneous=True, hard_negatives="own", seed=0)
    samplers = [NoDuplicatesBatchSampler(d, batch_size=4, drop_last=True, valid_label_columns=["label"],
                                         generator=torch.Generator(), seed=0) for d in parts.values()]
    concat = ConcatDataset(list(parts.values()))
    offsets = [0]
    for d in parts.values():
        offsets.append(offsets[-1] + len(d))
    seen = collections.Counter()
    for batch in ProportionalBatchSampler(concat, samplers, generator=torch.Generator(), seed=0):
        owners = {next(j for j in range(len(parts)) if offsets[j] <= i < offsets[j + 1]) for i in batch}
        assert len(owners) == 1
        seen[owners.pop()] += 1
    assert seen == {j: len(d) // 4 for j, d in enumerate(parts.values())}


def test_data_spec_parsing_and_config_files(tmp_path):
    assert DataSpec.parse("runs/x.jsonl") == DataSpec("runs/x.jsonl")
    assert DataSpec.parse("runs/x.jsonl:2.5") == DataSpec("runs/x.jsonl", weight=2.5)
    assert DataSpec.parse("sts=../shared/data/stsb:0.5") == DataSpec("../shared/data/stsb", weight=0.5, name="sts")
    config = TrainConfig(data=["a.jsonl:2", DataSpec("b", kind="sts")], out="o", dims=[64, 384, 128],
                         pretrain=StageConfig(data=["p.jsonl"], steps=5))
    assert config.dims == [384, 128, 64] and config.data[0].weight == 2.0
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    assert TrainConfig.load(tmp_path / "run.json") == config
    (tmp_path / "run.yaml").write_text("data: ['a.jsonl:2', {path: b, kind: sts}]\nout: o\ndims: [64, 384, 128]\n"
                                       "pretrain: {data: [p.jsonl], steps: 5}\n")
    assert TrainConfig.load(tmp_path / "run.yaml") == config
    with pytest.raises(ValueError, match="hard_negatives"):
        TrainConfig(data=["a"], out="o", hard_negatives="some")
    with pytest.raises(ValueError, match="unknown training config field"):
        TrainConfig.from_dict({"data": ["a"], "out": "o", "batchsize": 3})


# ---------------------------------------------------------------- runs


def test_train_from_minilm_with_pretraining_and_matryoshka(scifact_examples, shared_data, tmp_path):
    """A few steps from the packaged MiniLM: pairs pre-finetuning, then fine-tuning on the relabelled
    file mixed with STS-B pairs and Banking77 triples; the folder loads offline with its prompts."""
    from sentence_transformers import SentenceTransformer

    sts_dir = tmp_path / "sts-mini"  # a small STS set for the eval numbers in the card
    sts_dir.mkdir()
    lines = (shared_data / "stsb" / "test.tsv").read_text().splitlines()[:61]
    (sts_dir / "test.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    config = TrainConfig(
        data=[DataSpec(str(scifact_examples)), DataSpec(str(shared_data / "stsb"), limit=60, weight=0.5),
              DataSpec(str(shared_data / "banking77"), limit=16)],
        pretrain=StageConfig(data=[DataSpec(str(shared_data / "stsb"), limit=40)], steps=2),
        out=str(out), steps=3, batch_size=8, max_seq_length=64, logging_steps=1, save_steps=100,
        eval_tasks=[f"stsmini:sts={sts_dir}"], progress=False,
    )
    assert train(config) == out

    model = SentenceTransformer(str(out), device="cpu")
    assert model.prompts == saved_prompts()
    assert model.prompts["query"] == "task: search result | query: " and model.default_prompt_name is None
    text = "aspirin lowers the risk of heart attacks"
    q = model.encode_query([text], convert_to_tensor=True)
    assert torch.allclose(q, model.encode(["task: search result | query: " + text], convert_to_tensor=True), atol=1e-6)
    sci = model.encode([text], prompt_name="scifact", convert_to_tensor=True)
    assert torch.allclose(sci, model.encode(["task: fact checking | query: " + text], convert_to_tensor=True), atol=1e-6)
    assert SentenceTransformer(str(out), device="cpu", truncate_dim=64).encode([text]).shape == (1, 64)

    card = (out / "README.md").read_text()
    for needle in ("relabelled", "banking77", "stsb", "384, 256, 128, 64", "task: search result | query: ",
                   "temperature 0.05", "same-tower", "own hard negatives", "pretrain", "finetune", "loss.png",
                   "## Evaluation", "stsmini"):
        assert needle in card, needle
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "training.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["pretrain", "finetune"]
    pre, fine = record["stages"]
    assert pre["steps"] == 2 and fine["steps"] == 3
    assert pre["loss"]["hard_negatives"] == "none" and pre["loss"]["same_tower"] is False
    assert fine["loss"]["matryoshka_dims"] == [384, 256, 128, 64] and fine["loss"]["same_tower"] is True
    assert fine["mixture"] == {"relabelled": 12, "stsb": round(0.5 * fine["sources"][1]["examples"]), "banking77": 16}
    axes = record["principal_axes"]  # no corpus named: fitted on the training passages
    assert axes["fitted_on"] == "training passages" and 0 < axes["documents"] <= 12 + 60 + 2 * 16
    assert type(model[-1]).__name__ == "Dense" and "principal axes" in card
    assert not (out / ".train").exists()  # checkpoints removed after a finished run
    with pytest.raises(ValueError, match="finished training run"):
        train(config)


def test_train_with_listwise_distillation_from_relabeled_candidates(shared_data, tmp_path):
    """Relabel-format rows with scored candidates + their corpus: the KL term runs in a real run."""
    docs = {}
    for line in gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt"):
        doc = json.loads(line)
        docs[doc["_id"]] = doc
        if len(docs) == 96:
            break
    ids = list(docs)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(docs[i]) + "\n" for i in ids))
    rows = []
    for n in range(16):
        cands = ids[n * 6:(n + 1) * 6]  # no text in two rows: a batch of 8 can be drawn without repeats
        rows.append({"id": f"q{n}", "task": "search result", "query": docs[cands[0]]["title"],
                     "positive": docs[cands[0]]["text"], "positive_title": docs[cands[0]]["title"],
                     "negative": docs[cands[-1]]["text"], "negative_title": docs[cands[-1]]["title"],
                     "candidates": [{"id": c, "rank": r + 1, "fused": 1 / (r + 1), "ql": -5.0 - r, "retriever_score": 0.5}
                                    for r, c in enumerate(cands)]})
    data = tmp_path / "relabeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_source(DataSpec(str(data), corpus=str(corpus)))
    example = source.examples[0]
    assert len(example.candidates) == 6 and example.candidates[0][0] == example.positive
    dataset, _, negatives = build_datasets(build_mixture([source]), homogeneous=False, hard_negatives="own", seed=0,
                                           listwise=4, teacher="ql")
    assert negatives == 1 and dataset.column_names == ["anchor", "positive", "negative_1", "candidate_1", "candidate_2", "label"]
    assert dataset[0]["label"][:3] == [1.0, -5.0, -10.0]  # count, QL of p_1, QL of p_6
    both, _, _ = build_datasets(build_mixture([source]), homogeneous=False, hard_negatives="own", seed=0,
                                listwise=4, teacher="ql+retriever", retriever_weight=100.0)
    assert both[0]["label"][:3] == [1.0, 45.0, 40.0]  # QL + 100 x cosine: QL's softmax times the retriever's at t_s
    out = tmp_path / "model"
    with pytest.raises(TrainError, match="candidates"):
        train(TrainConfig(data=[DataSpec(str(data))], out=str(out), steps=1, batch_size=8, distill_weight=1.0, progress=False))
    config = TrainConfig(data=[DataSpec(str(data), corpus=str(corpus))], out=str(tmp_path / "model2"), steps=2, batch_size=8,
                         max_seq_length=64, distill_weight=1.0, distill_list=4, progress=False)
    train(config)
    record = json.loads((tmp_path / "model2" / "training.json").read_text())
    fine = record["stages"][-1]
    assert record["principal_axes"]["fitted_on"] == "corpus" and record["principal_axes"]["documents"] == 96
    # rows with QL and the retriever's score: the default teacher is their product, at t = 5
    assert "KL(teacher ql+retriever at t=5 || student) over 4 candidates" in fine["loss"]["formula"]
    assert fine["loss"]["distill_weight"] == 1.0
    cached = replace(config, out=str(tmp_path / "model3"), steps=1, mini_batch_size=4)  # the GradCache variant runs too
    train(cached)
    assert json.loads((tmp_path / "model3" / "training.json").read_text())["stages"][-1]["loss"]["mini_batch_size"] == 4


def test_principal_axes_keep_every_full_cosine_and_more_of_each_truncation(shared_data, tmp_path):
    """The rotation onto the documents' principal axes on the real MiniLM and SciFact abstracts:
    full-dimension cosines unchanged, the truncated documents closer to the full ones, a second
    rotation folded into the first layer, and the saved model giving the same embeddings."""
    from sentence_transformers import SentenceTransformer

    from gecko.embed import truncate
    from gecko.models import resolve_embedder
    from gecko.train.axes import principal_axes, rotate_onto_principal_axes

    docs = []
    for line in gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt"):
        docs.append(format_document(json.loads(line)["text"][:300]))
        if len(docs) == 200:
            break
    model = SentenceTransformer(resolve_embedder("default"), device="cpu")  # its own: this test changes it
    model.max_seq_length = 64
    before = model.encode(docs)
    summary = rotate_onto_principal_axes(model, docs[:150], [384, 128, 64])  # fitted on 150, checked on all 200
    after = model.encode(docs)
    assert summary["documents"] == 150 and summary["kept_share"]["384"] == 1.0
    assert 0.5 < summary["kept_share"]["64"] < summary["kept_share"]["128"] < 1.0
    assert np.allclose(after @ after.T, before @ before.T, atol=1e-5)
    for dim in (128, 64):  # how much of each document's direction its first `dim` coordinates keep
        kept = lambda emb: float(np.mean(np.sum(truncate(emb, dim) * emb[:, :dim], axis=1)))  # noqa: E731
        assert kept(after) > kept(before) + 0.1
    axes, share = principal_axes(after[:150])
    assert np.allclose(np.abs(np.diag(axes))[:64], 1.0, atol=1e-3) and np.isclose(share[-1], 1.0)  # already on its axes
    # (the leading ones: 150 documents span 150 of the 384 dims, the rest have no order)
    layers = len(model)
    rotate_onto_principal_axes(model, docs[:150], [384])
    again = model.encode(docs)
    assert len(model) == layers and np.allclose(again @ again.T, after @ after.T, atol=1e-5)  # folded, still orthogonal
    model.save(str(tmp_path / "rotated"))
    assert np.allclose(SentenceTransformer(str(tmp_path / "rotated"), device="cpu").encode(docs), model.encode(docs), atol=1e-6)


def test_default_teacher_is_ql_times_retriever_at_weight_4_where_every_relabeled_row_has_both():
    from gecko.train.run import _teacher_scores

    base = TrainConfig(data=["rows.jsonl"], out="model")

    def settings(config: TrainConfig, scores: frozenset[str]) -> tuple[str, float]:
        resolved = config.resolved(True, scores)
        return resolved.distill_teacher, resolved.distill_temperature

    assert settings(base, frozenset({"ql", "ql-mean", "fused", "retriever"})) == ("ql+retriever", 5.0)
    assert settings(base, frozenset({"ql", "ql-mean", "fused"})) == ("ql-mean", 0.42)
    assert settings(base, frozenset({"ql", "fused"})) == ("ql", 5.0)
    assert base.resolved(True).distill_weight == 4.0 and base.resolved(False).distill_weight == 0.0
    assert replace(base, distill_weight=1.0).resolved(True).distill_weight == 1.0
    assert settings(replace(base, distill_teacher="fused"), frozenset({"ql-mean"})) == ("fused", 0.35)
    assert settings(replace(base, distill_temperature=2.0), frozenset({"ql-mean"})) == ("ql-mean", 2.0)
    new = Example("q", "p", [], [("d", {"ql": -4.0, "ql-mean": -1.0, "fused": 1.0})])
    old = Example("q", "p", [], [("d", {"ql": -4.0, "ql-mean": None, "fused": 1.0})])  # relabel output before ql_mean
    source = lambda *examples: SourceData(DataSpec("rows.jsonl"), "rows", "examples", None, list(examples))  # noqa: E731
    assert _teacher_scores([source(new, new)]) == {"ql", "ql-mean", "fused"}
    assert _teacher_scores([source(new), source(old, Example("q", "p", [], []))]) == {"ql", "fused"}  # one older row: QL for all


def test_bad_data_leaves_no_state_and_a_kill_before_the_card_is_completed_by_resume(scifact_examples, tmp_path):
    out = tmp_path / "model"
    bad = TrainConfig(data=[DataSpec(str(tmp_path / "missing.jsonl"))], out=str(out), steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="missing.jsonl"):
        train(bad)
    assert not (out / ".train").exists()
    # the same --out with the data fixed is a new run, not "pass --resume"
    good = TrainConfig(data=[DataSpec(str(scifact_examples))], out=str(out), steps=1, batch_size=4, max_seq_length=32,
                       progress=False, keep_checkpoints=True)
    train(good)
    # as if killed after training.json, before the card and the clean-up
    (out / "README.md").unlink()
    assert (out / ".train").exists()
    train(TrainConfig(**{**good.__dict__, "resume": True, "keep_checkpoints": False}))
    assert (out / "README.md").is_file() and not (out / ".train").exists()


def test_a_batch_size_the_data_cannot_fill_without_repeats_is_an_error_not_an_untrained_model(scifact_examples, tmp_path):
    rows = [json.loads(line) for line in scifact_examples.read_text().splitlines()[:4]]
    same = tmp_path / "same-positive.jsonl"  # four queries, one positive text: no two rows can share a batch
    one = {"positive": rows[0]["positive"], "positive_title": rows[0]["positive_title"]}
    same.write_text("".join(json.dumps({**row, **one}) + "\n" for row in rows))
    out = tmp_path / "model"
    config = TrainConfig(data=[DataSpec(str(same))], out=str(out), steps=1, batch_size=2, max_seq_length=32, progress=False)
    with pytest.raises(TrainError, match="no training step was taken.*lower --batch-size"):
        train(config)
    assert not (out / "config.json").exists()


def _events(out: Path) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return events


def test_kill_9_then_resume_continues_from_the_last_checkpoint(scifact_examples, tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "gecko.cli", "train", "--data", str(scifact_examples), "--out", str(out), "--steps", "8",
           "--batch-size", "4", "--max-seq-length", "32", "--dims", "384,64", "--save-steps", "2", "--logging-steps", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = out / ".train" / "finetune" / "checkpoints"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:  # kill once checkpoint-4 is complete, mid-run
            if any(e["event"] == "checkpoint" and e["step"] >= 4 for e in _events(out)):
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 150 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(e["step"] for e in _events(out) if e["event"] == "log")
    assert killed_at < 8
    last_checkpoint = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")
                          if (p / "trainer_state.json").exists())
    assert last_checkpoint >= 4

    # without --resume the folder is refused; a --resume with other settings too
    same = dict(data=[DataSpec(str(scifact_examples))], out=str(out), batch_size=4, max_seq_length=32, dims=[384, 64])
    with pytest.raises(TrainError, match="pass --resume"):
        train(TrainConfig(steps=8, **same))
    with pytest.raises(TrainError, match=r"different configuration \(steps\)"):
        train(TrainConfig(steps=9, resume=True, **same))

    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = _events(out)
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["resumed_from"] == last_checkpoint
    after = [e["step"] for e in events[events.index(resume[0]):] if e["event"] == "log"]
    assert after == list(range(last_checkpoint + 1, 9))  # continues; does not restart at step 1
    record = json.loads((out / "training.json").read_text())
    fine = record["stages"][-1]
    assert fine["steps"] == 8 and fine["resumed_from"] == last_checkpoint
    logged = [h["step"] for h in fine["log_history"] if "loss" in h]
    assert logged == list(range(1, 9))  # the restored history plus the resumed steps, each once


def test_torchrun_two_processes_gloo(scifact_examples, shared_data, tmp_path):
    """DDP: `torchrun --nproc_per_node 2 -m gecko.cli train ...` on CPU (gloo), gathering across devices,
    with homogeneous batches from two sources (triples and STS pairs)."""
    torchrun = Path(PYTHON).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside the interpreter")
    out = tmp_path / "ddp"
    sts = tmp_path / "sts.tsv"
    sts.write_text("\n".join((shared_data / "stsb" / "train.tsv").read_text().splitlines()[:41]) + "\n")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "gecko.cli", "train", "--data", str(scifact_examples),
           "--data", str(sts), "--homogeneous", "--out", str(out), "--steps", "3", "--batch-size", "4",
           "--max-seq-length", "32", "--dims", "384,64", "--logging-steps", "1", "--no-progress"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    fine = record["stages"][-1]
    assert fine["args"]["world_size"] == 2 and fine["steps"] == 3 and fine["examples"] == 3 * 4 * 2
    assert fine["args"]["homogeneous_batches"] is True and set(fine["mixture"]) == {"relabelled", "sts"}
    assert fine["loss"]["gather_across_devices"] is True
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out), device="cpu").encode_query(["x"]).shape == (1, 384)
