"""The run report: `RUN_DIR/report.md` with its plots, rebuilt from the stage manifests on every run
(so a rerun that skips everything still leaves a complete, current report)."""

from __future__ import annotations

from pathlib import Path

from gecko.journal import pyplot, save_figure_atomic, write_text_atomic
from gecko.pipeline.config import PipelineConfig


def before_after_rows(results, baseline=None) -> list[dict]:
    """Main score ×100 of the base model (before) and the trained one (after), per task and dim."""
    rows = []
    for t in results.tasks:
        base = baseline.task(t.task) if baseline is not None else None
        for dim in results.dims:
            after = t.main_score(dim)
            before = base.main_score(dim) if base is not None else None
            rows.append({
                "task": t.task, "metric": t.main_metric, "dim": dim,
                "before": None if before is None else round(100 * before, 2),
                "after": None if after is None else round(100 * after, 2),
                "delta": None if before is None or after is None else round(100 * (after - before), 2),
            })
    return rows


def before_after_table(results, baseline=None) -> str:
    """A markdown table that also reads well in a terminal."""
    def fmt(value, sign=False):
        return "–" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"

    lines = ["| task | metric | dim | before (base) | after (trained) | Δ |", "|---|---|---:|---:|---:|---:|"]
    for r in before_after_rows(results, baseline):
        lines.append(f"| {r['task']} | {r['metric']} | {r['dim']} | {fmt(r['before'])} | {fmt(r['after'])} | {fmt(r['delta'], True)} |")
    return "\n".join(lines)


def holdout_lines(results, baseline) -> list[str]:
    """The label-free check's verdict: did training help on generated queries it never saw?"""
    rows = [r for r in before_after_rows(results, baseline) if r["task"] == "holdout" and r["delta"] is not None]
    if not rows:
        return []
    worse = [r for r in rows if r["delta"] < 0]
    others = [t.task for t in results.tasks if t.task != "holdout"]
    lines = ["", "**Label-free check** (`holdout`): generated queries of seed passages kept out of training, their "
             "relabeled positive as the relevant passage. " + (
                 f"**Warning: the trained model is worse than its base there at dim {', '.join(str(r['dim']) for r in worse)} "
                 f"(Δ {', '.join(format(r['delta'], '+.2f') for r in worse)}): the fine-tune did not help on this corpus.**"
                 if worse else f"The trained model is no worse than its base there at any dim "
                 f"(Δ {', '.join(format(r['delta'], '+.2f') for r in rows)} at {', '.join(str(r['dim']) for r in rows)}).")]
    lines.append("Synthetic queries come from the same LLM and prompts as the training data, so they overstate quality; "
                 + (f"the real tasks ({', '.join(others)}) are the numbers to trust." if others else
                    "add a labelled task to `eval.tasks` for numbers to trust."))
    return lines


def usage_table(config: PipelineConfig, summaries: dict[str, dict]) -> list[str]:
    """LLM calls, tokens and estimated cost per stage (the last time each stage ran)."""
    lines = ["", "### LLM tokens and cost", "",
             "| stage | LLM calls | from the cache | prompt tokens | generated tokens | estimated cost |",
             "|---|---:|---:|---:|---:|---:|"]
    total = 0.0
    for name, s in summaries.items():
        cost = s.get("cost")
        total += cost or 0.0
        shown = "no price" if cost is None else f"${cost:.4f}"
        lines.append(f"| {name} | {s['llm_calls']} | {s['llm_cache_hits']} | {s.get('tokens_in', 0)} | {s.get('tokens_out', 0)} | {shown} |")
    priced = any(s.get("cost") is not None for s in summaries.values())
    lines += ["", (f"Total ${total:.4f}, from the price table in the config ({', '.join(f'{k}: ${v.input}/${v.output} per 1M in/out' for k, v in config.prices.items())}); "
                   "Batch API calls at the discounted price, cached calls free."
                   if priced else "No price for this LLM in the config (`prices:`), so no cost estimate.")
              + (f" Budget: `max_cost` ${config.max_cost:g}." if config.max_cost is not None else "")]
    return lines


def max_abs_delta(results, baseline) -> float | None:
    deltas = [abs(r["delta"]) for r in before_after_rows(results, baseline) if r["delta"] is not None]
    return max(deltas) if deltas else None


def _plot_task_mix(task_mix: dict, path: Path) -> None:
    items = sorted(task_mix.items(), key=lambda kv: kv[1])
    fig, ax = pyplot().subplots(figsize=(6, 0.45 * len(items) + 1.2))
    ax.barh([k.replace("_", " ") for k, _ in items], [v for _, v in items], color="C0")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("generated queries")
    ax.set_title("task-type mix of the generated queries")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def _plot_relabel(summary: dict, path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    bins = summary.get("seed_rank", {})
    left.bar(list(bins), list(bins.values()), color="C1")
    left.set_xlabel("rank of the seed passage under the base retriever")
    left.set_ylabel("queries")
    left.set_title("where the retriever put the seed")
    changed, examples = summary.get("positive_changed", 0), summary.get("examples", 0)
    right.bar(["seed kept", "positive changed"], [examples - changed, changed], color=["C2", "C3"])
    right.set_title(f"positive changed: {changed / max(examples, 1):.0%} (paper: ~15%)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def write_report(run_dir: Path, config: PipelineConfig, runs, results, baseline) -> Path:
    """Write RUN_DIR/report.md (and task_mix.png, relabel.png) atomically; returns its path."""
    run_dir = Path(run_dir)
    manifests = {r.name: r.manifest for r in runs}
    gen, rel, tr, ev = (manifests[n] for n in ("generate", "relabel", "train", "eval"))
    lines = [f"# gecko run: `{run_dir}`", ""]
    lines.append(f"Config: `{config.source or 'given in Python'}` (as run, every default filled in: `config.yaml`). "
                 "Each stage's manifest (`<stage>/manifest.json`) holds its config, input and output hashes, counts and timings.")
    lines += ["", "| stage | this run | finished | wall time (its last run) | counts |", "|---|---|---|---:|---|"]
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in r.manifest.get("counts", {}).items())
        lines.append(f"| {r.name} | {r.status} | {r.manifest.get('finished', '')} | {r.manifest.get('wall_s', 0):.0f} s | {counts} |")

    g = gen["summary"]
    rate = g["passages_with_query"] / max(g["passages"], 1)
    lines += ["", "## 1 generate (the LLM writes a task and a query per passage)", "",
              f"- passages: {g['passages']}"
              + (f" of the corpus's {g['corpus_passages']} (`generate.limit`, `generate.sample`)"
                 if g.get("corpus_passages", 0) > g["passages"] else "")
              + f", {g['passages_with_query']} with an accepted query ({rate:.0%}); "
              f"queries: {g['accepted']}, mean {g['mean_query_words']:.1f} words",
              "- rejected answers (retried with another seed): "
              + (", ".join(f"{k} {v}" for k, v in sorted(g["rejected"].items(), key=lambda kv: -kv[1])) or "none"),
              f"- LLM calls: {g['llm_calls']} (+{g['llm_cache_hits']} from the cache), tokens in {g['tokens_in']}, out {g['tokens_out']}"]
    if g.get("prompt_style"):
        lines.append(f"- prompt style: **{g['prompt_style']}** (the LLM generates through chat completions)")
    if g["task_mix"]:
        _plot_task_mix(g["task_mix"], run_dir / "task_mix.png")
        lines += ["", "![task-type mix](task_mix.png)"]

    s = rel["summary"]
    lines += ["", "## 2 relabel (retrieve top-N, the LLM re-ranks: positive and hard negative)", "",
              f"- queries: {s['queries']}, training examples: {s['examples']}"
              + (f", skipped: {s['skipped']}" if s["skipped"] else ""),
              f"- **positive changed** (the LLM's top passage is not the seed): {s['positive_changed']} of {s['examples']} "
              f"({s['positive_changed_rate']:.1%}; the paper saw ~15%)",
              "- seed rank under the base retriever: " + ", ".join(f"{k}: {v}" for k, v in s["seed_rank"].items()),
              f"- likely false negatives kept out of the negatives: {s.get('likely_false_negatives', 0)}"
              + ("" if s["config"].get("false_negative_ratio") or s["config"].get("false_negative_ql_margin") else " (guard off)"),
              f"- fusion: {s['config'].get('fusion')}, top_n {s['config'].get('top_n')}; LLM pairs scored: {s['pairs_scored']}, "
              f"calls {s['llm_calls']} (+{s['llm_cache_hits']} from the cache)"]
    if s.get("spearman_ql_rc") is not None:
        lines.append(f"- mean per-query Spearman(QL, RC): {s['spearman_ql_rc']:+.3f}")
    if s.get("ql_unavailable"):
        lines.append(f"- **QL unavailable** ({s['ql_unavailable']}): fused `{s['fusion_used']}` (RC + retriever) instead")
    if s.get("rc_bounds"):
        lines.append("- RC labels absent from the top log-probabilities, RC used as a bound: "
                     + ", ".join(f"{k} {v}" for k, v in s["rc_bounds"].items()))
    _plot_relabel(s, run_dir / "relabel.png")
    lines += ["", "![relabel](relabel.png)"]

    lines += usage_table(config, {"generate": g, "relabel": s})

    t = tr["summary"]
    lines += ["", "## 3 train (in-batch + hard + same-tower negatives, Matryoshka)", ""]
    for st in t["stages"]:
        lines.append(f"- {st['name']}: {st['steps']} steps, mixture {st['mixture']}, {st['examples_per_s']} examples/s"
                     + (f", resumed from step {st['resumed_from']}" if st.get("resumed_from") else ""))
    loss = " → ".join(f"{v:.3f}" for v in (t["first_loss"], t["last_loss"]) if v is not None) or "not logged"
    lines += [f"- loss: {loss} (first and last logged step)",
              f"- model: `train/model` (model card `train/model/README.md`)", "", "![loss](train/model/loss.png)"]

    from gecko.evaluate.report import PROMPT_WORDS

    lines += ["", "## 4 eval: the base model (before) vs the trained one (after), at every Matryoshka dim", "",
              f"Main score ×100; Δ = after − before, points. Prompts: {PROMPT_WORDS.get(results.prompts, results.prompts)}"
              + (": the trained model as its card says, the base as MTEB scores it." if results.prompts == "model" else "."),
              "", before_after_table(results, baseline), ""]
    for task in results.tasks:
        sizes = ", ".join(f"{k} {v}" for k, v in task.sizes.items())
        lines.append(f"- {task.task}: {task.type}, split {task.split}, {sizes}; scored by {results.backend}")
    lines += holdout_lines(results, baseline)
    same = run_dir / "eval" / "trained-gecko" / "results.json"
    if same.is_file():
        from gecko.evaluate import load_results

        base_same = run_dir / "eval" / "base-gecko"
        lines += ["", "Both models with the same prompts (the Gecko formats on every text): what training changed, "
                  "apart from how each model is best used.", "",
                  before_after_table(load_results(same.parent), load_results(base_same) if base_same.is_dir() else None)]
    lines += ["", "![score vs dim](eval/trained/score_vs_dim.png)", "",
              "Full tables: `eval/trained/results.md` (with the Δ column), `eval/base/results.md`; "
              "raw scores in `results.json` beside them."]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
