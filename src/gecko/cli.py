"""`gecko ...`: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from gecko.models import DEFAULT


def _cmd_corpus_check(args: argparse.Namespace) -> int:
    from gecko.corpus import check_corpus

    summary = check_corpus(args.path, lenient=args.lenient, max_tokens=args.max_tokens, tokenizer=args.tokenizer)
    print(summary.render())
    return 0


def _cmd_llm_generate(args: argparse.Namespace) -> int:
    from gecko.llm import GenerationParams, load_llm

    llm = load_llm(args.llm, use_cache=not args.no_cache)
    params = GenerationParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, stop=tuple(args.stop), seed=args.seed
    )
    (text,) = llm.generate([args.prompt], params)
    print(json.dumps({"text": text}, ensure_ascii=False))
    return 0


def _cmd_llm_score(args: argparse.Namespace) -> int:
    from gecko.llm import load_llm

    llm = load_llm(args.llm, use_cache=not args.no_cache)
    (scored,) = llm.score(args.prefix, [args.continuation])
    print(json.dumps(scored.to_dict(), ensure_ascii=False))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from gecko.generate import GenerateConfig, run_generate
    from gecko.llm import load_llm

    config = GenerateConfig(
        task_types=tuple(args.task_types or GenerateConfig.task_types),
        per_passage=args.per_passage,
        seed=args.seed,
        max_attempts=args.max_attempts,
        temperature=args.temperature,
        prompt_style=args.prompt_style,
        batch_size=args.batch_size,
    )
    llm = load_llm(args.llm)
    summary = run_generate(args.corpus, args.out, llm, config, limit=args.limit, lenient=args.lenient, progress=not args.summary_json)
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gecko.demo import run_demo

    run_demo(out_dir=args.out, passages=args.passages, llm_spec=args.llm)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from gecko.evaluate import EvalError, evaluate, load_baseline
    from gecko.evaluate.report import is_results

    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()] if args.dims else None
    except ValueError:
        print(f"gecko: error: --dims {args.dims!r}: expected comma-separated integers, e.g. 384,256,128,64", file=sys.stderr)
        return 2
    options = dict(
        prompts=not args.no_prompts, backend=args.backend, cache_dir=args.cache_dir, device=args.device,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    try:
        # a previous run is read first (a bad path fails fast); a baseline model is scored after ours
        baseline = load_baseline(args.baseline) if args.baseline and is_results(args.baseline) else None
        results = evaluate(args.model, args.task, dims, **options)
        if args.baseline and baseline is None:
            baseline = load_baseline(args.baseline, args.task, dims, **options)
        paths = results.write(args.out, baseline=baseline)
    except (EvalError, OSError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    print(results.table(baseline))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gecko", description="Text embeddings distilled from an LLM (the Gecko recipe).")
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("corpus", help="inspect and validate a corpus").add_subparsers(dest="action", required=True)
    check = corpus.add_parser("check", help="validate a corpus and print its counts")
    check.add_argument("path", help="JSONL(.gz), BEIR dir, Parquet, CSV/TSV or a dir of .txt/.md files")
    check.add_argument("--lenient", action="store_true", help="skip and count bad records instead of failing")
    check.add_argument("--max-tokens", type=int, default=None, help="split documents into passages of at most N tokens")
    check.add_argument("--tokenizer", default=DEFAULT, help="tokenizer for --max-tokens (embedder folder; default: packaged MiniLM)")
    check.set_defaults(func=_cmd_corpus_check)

    llm = commands.add_parser("llm", help="call the LLM backend directly").add_subparsers(dest="action", required=True)
    llm_opts = argparse.ArgumentParser(add_help=False)
    llm_opts.add_argument("--llm", default=DEFAULT, help="default | llamacpp:PATH.gguf | openai:URL#MODEL | transformers:DIR")
    llm_opts.add_argument("--no-cache", action="store_true", help="bypass the LLM call cache")
    gen = llm.add_parser("generate", parents=[llm_opts], help="complete a prompt; prints JSON {text}")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_cmd_llm_generate)
    score = llm.add_parser("score", parents=[llm_opts], help="teacher-forced log-probabilities; prints JSON")
    score.add_argument("--prefix", required=True)
    score.add_argument("--continuation", required=True)
    score.set_defaults(func=_cmd_llm_score)
    gen = commands.add_parser("generate", help="FRet step 1: the LLM writes a task and a query per passage")
    gen.add_argument("--corpus", required=True, help="corpus file or folder (see `gecko corpus check`)")
    gen.add_argument("--out", required=True, help="output JSONL; OUT.journal holds progress for resuming")
    gen.add_argument("--limit", type=int, default=None, help="only the first N passages")
    gen.add_argument("--llm", default=DEFAULT, help="default | llamacpp:PATH.gguf | openai:URL#MODEL | transformers:DIR")
    gen.add_argument("--task-types", nargs="+", default=None, help="subset of the task-type catalogue (default: all)")
    gen.add_argument("--per-passage", type=int, default=1, help="accepted queries wanted per passage")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-attempts", type=int, default=3, help="tries per query before giving up on it")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (retries draw new seeds)")
    gen.add_argument("--prompt-style", choices=["completion", "chat"], default="completion",
                     help="few-shot completion (base models) or an instruction (chat-tuned models)")
    gen.add_argument("--batch-size", type=int, default=8, help="passages per journal commit")
    gen.add_argument("--lenient", action="store_true", help="skip and count bad corpus records")
    gen.add_argument("--summary-json", action="store_true", help="print the summary as JSON, no progress bar")
    gen.set_defaults(func=_cmd_generate)

    demo = commands.add_parser("demo", help="run the pipeline on the bundled sample with the packaged models")
    demo.add_argument("--passages", type=int, default=10)
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--llm", default=DEFAULT)
    demo.set_defaults(func=_cmd_demo)

    ev = commands.add_parser("eval", help="MTEB-style scores at each Matryoshka dim, with a report")
    ev.add_argument("--model", default=DEFAULT, help="embedder folder (sentence-transformers), or default = packaged all-MiniLM-L6-v2")
    ev.add_argument("--task", action="append", required=True, metavar="NAME[:TYPE]=PATH",
                    help="repeatable; known names: scifact, stsb, sts12..sts16, banking77; others are typed from the folder "
                    "or by TYPE (retrieval, sts, classification)")
    ev.add_argument("--dims", default=None, help="comma-separated Matryoshka dims, e.g. 384,256,128,64 (default: full)")
    ev.add_argument("--baseline", default=None, help="a previous run (results.json or its folder) or a model to compare with")
    ev.add_argument("--no-prompts", action="store_true", help="embed plain texts (as MTEB does for models without prompts)")
    ev.add_argument("--out", required=True, help="folder for results.json, results.md, score_vs_dim.png and mteb/")
    ev.add_argument("--backend", default="auto", choices=("auto", "mteb", "builtin"), help="scorer: mteb if installed (auto), or built-in")
    ev.add_argument("--cache-dir", default=None, help="embedding cache (default: $GECKO_HOME/embeddings)")
    ev.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gecko.corpus import CorpusError
    from gecko.llm import LLMError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CorpusError, LLMError, FileNotFoundError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
