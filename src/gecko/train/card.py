"""The model card (README.md) and loss plot written beside a trained model."""

from __future__ import annotations

from pathlib import Path

from gecko.journal import save_figure_atomic, write_text_atomic


def plot_loss(stages, path: Path) -> Path:
    """Training loss against step, one line per stage (pre-finetuning, fine-tuning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for stage in stages:
        points = [(h["step"], h["loss"]) for h in stage.log_history if "loss" in h and "step" in h]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="." if len(points) < 40 else None, label=stage.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (sum over Matryoshka dims)")
    ax.set_title("gecko train: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _usage_with_prompts(prompts: dict[str, str]) -> list[str]:
    return [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(PATH)                   # or truncate_dim=256 for a smaller embedding",
        "q = model.encode_query([\"does aspirin thin blood?\"])  # prompt 'query': task: search result | query: ...",
        "d = model.encode_document([\"Aspirin inhibits ...\"])  # prompt 'document': title: none | text: ...",
        "c = model.encode([\"a claim\"], prompt_name=\"scifact\")  # the task prompt of a known eval set",
        "x = model.encode([\"task: my task | query: my text\"])  # no default prompt: texts go in as given",
        "```",
        "",
        "Queries were trained as `task: {task} | query: {text}`, documents as `title: {title} | text: {text}`; "
        "symmetric tasks (STS, classification) use the query format on both sides in training, but embed their "
        "texts plain, with no prompt, when you use the model: that scored higher on STS-B (gecko's README, Quality). "
        "For another retrieval task, pass `prompt=\"task: <your task> | query: \"` for its queries.",
        "",
        "### Saved prompts",
        "",
        _table(["prompt_name", "prefix"], [[f"`{k}`", f"`{v}`"] for k, v in prompts.items()]),
        "",
    ]


def _usage_plain() -> list[str]:
    return [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(PATH)  # or truncate_dim=256 for a smaller embedding",
        "q = model.encode([\"does aspirin thin blood?\"])  # queries and documents as they are",
        "```",
        "",
        "Trained on plain texts (`gecko train --no-prompts`): queries as they are, documents as `{title} {text}`, "
        "as MTEB embeds a model without prompts; no prompts are saved.",
        "",
    ]


def _axes_line(axes: dict | None) -> list[str]:
    if not axes:
        return []
    kept = ", ".join(f"{d} dims {100 * share:.1f}%" for d, share in axes["kept_share"].items())
    return ["", f"The last layer rotates the embedding onto the principal axes of {axes['documents']} documents of the "
            f"{axes['fitted_on']} (`gecko.train.axes`): full-dimension similarities are unchanged, and the first "
            f"coordinates hold the most of that corpus, so truncating costs less on it (on other domains a truncated "
            f"embedding may score lower). Share of the documents' squared norm the first dims keep: {kept}."]


def model_card(record: dict, eval_md: str | None = None) -> str:
    stages = record["stages"]
    final = stages[-1]
    loss = final["loss"]
    dims = loss["matryoshka_dims"]
    prompts = record["prompts"]
    parts = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, gecko, matryoshka]",
        "---",
        "",
        "# Gecko-trained embedder",
        "",
        f"Fine-tuned from `{record['base']}` (`{record['base_path']}`) with `gecko train`, the Gecko recipe "
        "(Lee et al. 2024, arXiv 2403.20327): contrastive loss with in-batch, hard and same-tower negatives, "
        f"Matryoshka dims {', '.join(map(str, dims))}.",
        *_axes_line(record.get("principal_axes")),
        "",
        "## Usage",
        "",
        *(_usage_with_prompts(prompts) if prompts else _usage_plain()),
        "## Training data",
        "",
    ]
    for stage in stages:
        parts.append(f"**{stage['name']}**" + (" (finished in an earlier run)" if stage.get("skipped") else "") + ":")
        parts.append("")
        rows = []
        for src in stage["sources"]:
            rows.append([src["name"], f"`{src['path']}`", src["kind"], src["task"], src["symmetric"], src["rows"],
                         src["examples"], src["with_negatives"], src["weight"], stage["mixture"].get(src["name"], 0),
                         ", ".join(f"{k}: {v}" for k, v in src["dropped"].items()) or "-"])
        parts.append(_table(["source", "path", "kind", "task", "symmetric", "rows read", "examples", "with negatives",
                             "weight", "per epoch", "dropped"], rows))
        parts.append("")
    parts += [
        "Weights: each source contributes round(weight x examples) examples per epoch (repeats are reshuffled "
        "passes); batches never hold the same text twice (no-duplicates sampler). Classification sets are triples "
        "(x, same label, other label) with one unique id appended to all three texts.",
        "",
        "## Loss",
        "",
        f"{loss['formula']}, temperature {loss['temperature']:g} (scale {loss['scale']:g}), inside Matryoshka "
        f"over dims {dims} with weights {loss['matryoshka_weights']}.",
        "",
        _table(["setting", "value"], [[k, f"`{v}`"] for k, v in loss.items() if k != "formula"]),
        "",
        "## Training",
        "",
    ]
    rows = []
    for stage in stages:
        a = stage["args"]
        rows.append([stage["name"], stage["steps"], a["batch_size_per_device"], a["world_size"], a["learning_rate"],
                     a["max_seq_length"], a["precision"], a["device"], stage["examples"], stage["seconds"],
                     stage["examples_per_s"], stage["resumed_from"]])
    parts.append(_table(["stage", "steps", "batch/device", "devices", "lr", "max seq len", "precision", "device",
                         "examples (this run)", "seconds", "examples/s", "resumed from step"], rows))
    parts += ["", "![training loss](loss.png)", ""]
    if eval_md:
        # the report's own title becomes a bold line under our heading
        lines = [f"**{line[2:].strip()}**" if line.startswith("# ") else line for line in eval_md.splitlines()]
        parts += ["## Evaluation", "", "`gecko.evaluate` with the task prompts, at each Matryoshka dim.", "", *lines, ""]
    versions = record.get("versions", {})
    parts += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(parts)


def write_model_card(out: Path, record: dict, eval_md: str | None = None) -> Path:
    return write_text_atomic(out / "README.md", model_card(record, eval_md))
