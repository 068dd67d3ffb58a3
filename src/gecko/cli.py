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


def _cmd_demo(args: argparse.Namespace) -> int:
    from gecko.demo import run_demo

    run_demo(passages=args.passages, llm_spec=args.llm)
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
    demo = commands.add_parser("demo", help="run the pipeline on the bundled sample with the packaged models")
    demo.add_argument("--passages", type=int, default=5)
    demo.add_argument("--llm", default=DEFAULT)
    demo.set_defaults(func=_cmd_demo)
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
