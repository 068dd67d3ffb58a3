"""`gecko ...`: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from gecko.models import DEFAULT
from gecko.options import add_options, given


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

    config = GenerateConfig(**given(args, GenerateConfig))
    if args.engine == "ray":  # its errors are LLMErrors, reported by main
        from gecko.scale import run_generate_ray

        summary = run_generate_ray(args.corpus, args.out, args.llm, config, _ray_config(args), limit=args.limit,
                                   sample=args.sample, lenient=args.lenient, progress=not args.summary_json,
                                   prices=_prices(args), max_cost=args.max_cost)
    else:
        llm = _load_llm(args)
        summary = run_generate(args.corpus, args.out, llm, config, limit=args.limit, lenient=args.lenient,
                               progress=not args.summary_json, sample=args.sample)
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _prices(args: argparse.Namespace) -> dict:
    """`--price INPUT,OUTPUT` as the price table of `--llm`'s model."""
    from gecko.llm import LLMSpec, Price

    if not args.price:
        return {}
    try:
        price = Price(*(float(v) for v in args.price.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"--price {args.price!r}: expected INPUT,OUTPUT US dollars per million tokens, e.g. 0.15,0.6") from None
    return {LLMSpec.parse(args.llm).model or args.llm: price}


def _llm_options(args: argparse.Namespace) -> dict:
    return {"batch": True} if args.batch else {}


def _load_llm(args: argparse.Namespace):
    """The stage's LLM with the cost options (`--price`, `--max-cost`, `--batch`) of generate and relabel."""
    from gecko.llm import load_llm

    return load_llm(args.llm, prices=_prices(args), max_cost=args.max_cost, **_llm_options(args))


def _ray_config(args: argparse.Namespace):
    from gecko.scale import RayConfig

    return RayConfig(address=args.ray_address, actors=args.actors, llm_options=_llm_options(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from gecko.demo import run_demo
    from gecko.pipeline import PipelineError

    try:
        run_demo(out_dir=args.out, overrides=args.overrides, progress=not args.no_progress)
    except PipelineError as err:  # a RuntimeError; ConfigError is a ValueError, as main reports
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from gecko.pipeline import PipelineError, load_config, run_pipeline, start_in_background

    try:
        config = load_config(args.config, args.overrides)
        if args.show_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), end="")
            return 0
        if args.background:
            argv = [args.config, *args.overrides] + (["--no-progress"] if args.no_progress else [])
            pid, log = start_in_background(config, argv)
            print(f"gecko run started in the background: pid {pid}, log {log}\n"
                  "it outlives this shell; the same command again resumes it after a crash or a kill")
            return 0
        result = run_pipeline(config, progress=not args.no_progress)
    except PipelineError as err:  # the stages' input errors are ValueErrors, reported by main
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    print(result.table())
    print(f"report: {result.report}")
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
        prompts="none" if args.no_prompts else args.prompts, backend=args.backend, cache_dir=args.cache_dir, device=args.device,
        batch_size=args.batch_size, progress=not args.no_progress, **_beir_options(args),
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


def _beir_options(args: argparse.Namespace) -> dict:
    from gecko.evaluate.tasks import IDENTICAL_IDS

    return {"ignore_identical_ids": IDENTICAL_IDS[args.ignore_identical_ids], "strict": args.strict}


def _cmd_relabel(args: argparse.Namespace) -> int:
    from gecko.relabel import RelabelConfig, ScoreConfig, run_relabel
    from gecko.retrieve import RetrieveConfig

    if args.weights and args.fusion not in (None, "weighted"):
        raise ValueError(f"--weights applies to --fusion weighted, not {args.fusion}")
    config = RelabelConfig(**given(args, RelabelConfig), score=ScoreConfig(**given(args, ScoreConfig)),
                           retrieve=RetrieveConfig(**given(args, RetrieveConfig)))
    if args.engine == "ray":
        from gecko.scale import run_relabel_ray

        summary = run_relabel_ray(args.generated, args.corpus, args.out, args.llm, config, _ray_config(args),
                                  limit=args.limit, progress=not args.summary_json,
                                  prices=_prices(args), max_cost=args.max_cost)
    else:
        summary = run_relabel(args.generated, args.corpus, args.out, _load_llm(args), config, limit=args.limit,
                              progress=not args.summary_json)
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _cmd_rerank_eval(args: argparse.Namespace) -> int:
    from gecko.journal import write_json_atomic
    from gecko.llm import load_llm
    from gecko.relabel import ScoreConfig, run_rerank_eval
    from gecko.retrieve import RetrieveConfig

    retrieve = RetrieveConfig(**given(args, RetrieveConfig), query_format="{query}")
    result = run_rerank_eval(args.dataset, load_llm(args.llm), top_n=args.top_n, limit=args.limit, split=args.split,
                             score=ScoreConfig(**given(args, ScoreConfig)), retrieve=retrieve, progress=not args.summary_json,
                             **_beir_options(args))
    if args.out:
        write_json_atomic(args.out, result.to_dict())
    print(json.dumps(result.to_dict()) if args.summary_json else result.render())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from gecko.train import DataSpec, StageConfig, TrainConfig, train

    fields = TrainConfig.read_file(args.config) if args.config else {}
    fields.update(given(args, TrainConfig))
    if args.data:  # --corpus belongs to these sources, not to those of --config
        fields["data"] = [DataSpec.parse(d) for d in args.data]
        for spec in fields["data"]:
            spec.corpus = spec.corpus or args.corpus
    if args.pretrain_data:
        fields["pretrain"] = StageConfig(**given(args, StageConfig, "pretrain-"))
    if not fields.get("data") or not fields.get("out"):
        raise ValueError("--data and --out are required (or give them in --config)")
    path = train(TrainConfig.from_dict(fields))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: printed once
        print(f"model: {path}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from gecko.encode import encode_file

    summary = encode_file(args.input, args.out, args.model, dims=args.dims, as_=args.as_, task=args.task,
                          chunk_size=args.chunk_size, lenient=args.lenient, text_field=args.text_field,
                          id_field=args.id_field, progress=not args.summary_json)
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from gecko.serve import ServeConfig, run_server

    run_server(ServeConfig(**{**given(args, ServeConfig), "api_key": args.api_key or os.environ.get("GECKO_API_KEY") or None}))
    return 0


LLM_HELP = "default | llamacpp:PATH.gguf | openai:URL#MODEL | transformers:DIR"
NO_PROGRESS = "no progress bars or stage lines"
SUMMARY_JSON = "print the summary as JSON, no progress bar"
EMBEDDING_CACHE = "embedding cache (default: $GECKO_HOME/embeddings)"


def _parent(*options: tuple[str, dict]) -> argparse.ArgumentParser:
    """Options several commands share, as an argparse parent."""
    parent = argparse.ArgumentParser(add_help=False)
    for flag, settings in options:
        parent.add_argument(flag, **settings)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gecko", description="Text embeddings distilled from an LLM (the Gecko recipe).")
    commands = parser.add_subparsers(dest="command", required=True)
    llm = _parent(("--llm", {"default": DEFAULT, "help": LLM_HELP}))
    for add in (_add_corpus, _add_llm, _add_generate, _add_demo, _add_run, _add_eval, _add_relabel, _add_rerank_eval, _add_train,
                _add_encode, _add_serve):
        add(commands, llm)
    return parser


def _add_corpus(commands, llm) -> None:
    corpus = commands.add_parser("corpus", help="inspect and validate a corpus").add_subparsers(dest="action", required=True)
    check = corpus.add_parser("check", help="validate a corpus and print its counts")
    check.add_argument("path", help="JSONL(.gz), BEIR dir, Parquet, CSV/TSV or a dir of .txt/.md files")
    check.add_argument("--lenient", action="store_true", help="skip and count bad records instead of failing")
    check.add_argument("--max-tokens", type=int, default=None, help="split documents into passages of at most N tokens")
    check.add_argument("--tokenizer", default=DEFAULT, help="tokenizer for --max-tokens (embedder folder; default: packaged MiniLM)")
    check.set_defaults(func=_cmd_corpus_check)


def _add_llm(commands, llm) -> None:
    actions = commands.add_parser("llm", help="call the LLM backend directly").add_subparsers(dest="action", required=True)
    cache = _parent(("--no-cache", {"action": "store_true", "help": "bypass the LLM call cache"}))
    gen = actions.add_parser("generate", parents=[llm, cache], help="complete a prompt; prints JSON {text}")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_cmd_llm_generate)
    score = actions.add_parser("score", parents=[llm, cache], help="teacher-forced log-probabilities; prints JSON")
    score.add_argument("--prefix", required=True)
    score.add_argument("--continuation", required=True)
    score.set_defaults(func=_cmd_llm_score)


def _llm_work() -> list[argparse.ArgumentParser]:
    """Where generate's and relabel's LLM work runs, and what it may cost."""
    engine = _parent(
        ("--engine", {"choices": ["local", "ray"], "default": "local",
                      "help": "ray: LLM batches on Ray actors, output a folder of shards + manifest.json (pip install 'gecko[ray]')"}),
        ("--ray-address", {"default": None, "help": "with --engine ray: 'auto' or HOST:PORT (default: RAY_ADDRESS or a local Ray)"}),
        ("--actors", {"type": int, "default": None, "help": "with --engine ray: LLM actors (default: one per cluster CPU)"}),
    )
    cost = _parent(
        ("--price", {"default": None, "metavar": "INPUT,OUTPUT",
                     "help": "US dollars per million prompt, generated tokens of --llm: the summary estimates the cost"}),
        ("--max-cost", {"type": float, "default": None,
                        "help": "stop (cleanly, journaled) before the next LLM call once the estimate reaches this; needs --price"}),
        ("--batch", {"action": "store_true", "help": "openai: send the calls through OpenAI's Batch API (half the price, slower)"}),
    )
    return [engine, cost]


def _add_generate(commands, llm) -> None:
    from gecko.generate import PASSAGE_SAMPLE, GenerateConfig

    gen = commands.add_parser("generate", parents=[*_llm_work(), llm], help="FRet step 1: the LLM writes a task and a query per passage")
    gen.add_argument("--corpus", required=True, help="corpus file or folder (see `gecko corpus check`)")
    gen.add_argument("--out", required=True, help="output JSONL; OUT.journal holds progress for resuming")
    gen.add_argument("--limit", type=int, default=None, help="only the first N passages")
    gen.add_argument("--sample", type=int, default=None,
                     help="then a seeded uniform sample of N of them (default: every one; `gecko run` samples "
                     f"{PASSAGE_SAMPLE})")
    add_options(gen, GenerateConfig)
    gen.add_argument("--lenient", action="store_true", help="skip and count bad corpus records")
    gen.add_argument("--summary-json", action="store_true", help=SUMMARY_JSON)
    gen.set_defaults(func=_cmd_generate)


def _add_demo(commands, llm) -> None:
    demo = commands.add_parser("demo", help="the whole recipe on the bundled SciFact sample with the packaged models (minutes)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the bundled config, e.g. relabel.top_n=5")
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    demo.set_defaults(func=_cmd_demo)


def _add_run(commands, llm) -> None:
    run = commands.add_parser("run", help="generate -> relabel -> train -> eval from one YAML config; reruns skip finished stages")
    run.add_argument("config", help="YAML config (see configs/scifact.yaml)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted keys, values read as YAML, e.g. relabel.top_n=10 train.epochs=2 eval.dims=[384,64]")
    run.add_argument("--show-config", action="store_true", help="print the config with every default filled in, and exit")
    run.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    run.add_argument("--background", action="store_true",
                     help="start the run as its own process (outlives the shell; log in RUN_DIR/run.log) and return")
    run.set_defaults(func=_cmd_run)


def _beir() -> argparse.ArgumentParser:
    """How a BEIR folder is scored: eval and rerank-eval."""
    from gecko.evaluate.tasks import IDENTICAL_IDS, RetrievalTask

    return _parent(
        ("--ignore-identical-ids", {
            "choices": list(IDENTICAL_IDS), "default": next(k for k, v in IDENTICAL_IDS.items() if v is RetrievalTask.ignore_identical_ids),
            "help": "leave a query's own document (same id) out of its ranking; auto (default): as mteb's task of that name, else "
            "yes when query ids occur in the corpus (BEIR's default)"}),
        ("--strict", {"action": "store_true", "default": RetrievalTask.strict,
                      "help": "refuse qrels that name documents absent from the corpus (default: report them and score them as "
                      "pytrec_eval does)"}),
    )


def _add_eval(commands, llm) -> None:
    from gecko.formats import PROMPT_MODES

    ev = commands.add_parser("eval", parents=[_beir()], help="MTEB-style scores at each Matryoshka dim, with a report")
    ev.add_argument("--model", default=DEFAULT, help="embedder folder (sentence-transformers), or default = packaged all-MiniLM-L6-v2")
    ev.add_argument("--task", action="append", required=True, metavar="NAME[:TYPE]=PATH",
                    help="repeatable; known names: scifact, stsb, sts12..sts16, banking77; others are typed from the folder "
                    "or by TYPE (retrieval, sts, classification)")
    ev.add_argument("--dims", default=None, help="comma-separated Matryoshka dims, e.g. 384,256,128,64 (default: full)")
    ev.add_argument("--baseline", default=None, help="a previous run (results.json or its folder) or a model to compare with")
    ev.add_argument("--prompts", choices=list(PROMPT_MODES), default="model",
                    help="model (default): as the model says to use it, its saved prompts (none saved: plain texts, as MTEB "
                    "scores it); gecko: the paper's formats for any model; none: plain texts")
    ev.add_argument("--no-prompts", action="store_true", help="the same as --prompts none")
    ev.add_argument("--out", required=True, help="folder for results.json, results.md, score_vs_dim.png and mteb/")
    ev.add_argument("--backend", default="auto", choices=("auto", "mteb", "builtin"), help="scorer: mteb if installed (auto), or built-in")
    ev.add_argument("--cache-dir", default=None, help=EMBEDDING_CACHE)
    ev.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)


def _pair_scoring(llm) -> argparse.ArgumentParser:
    """LLM pair-scoring options shared by relabel and rerank-eval."""
    from gecko.relabel import ScoreConfig

    pair = argparse.ArgumentParser(add_help=False, parents=[llm])
    add_options(pair, ScoreConfig)
    pair.add_argument("--summary-json", action="store_true", help=SUMMARY_JSON)
    return pair


def _add_relabel(commands, llm) -> None:
    from gecko.relabel import RelabelConfig
    from gecko.retrieve import RetrieveConfig

    rl = commands.add_parser("relabel", parents=[_pair_scoring(llm), *_llm_work()],
                             help="FRet step 2: retrieve top-N, re-rank with the LLM (QL + RC), pick positive and hard negative")
    rl.add_argument("--generated", required=True, help="generated.jsonl from `gecko generate`")
    rl.add_argument("--corpus", required=True, help="the corpus the queries were generated from (and are retrieved in)")
    rl.add_argument("--out", required=True, help="output .jsonl or .parquet; OUT.journal holds progress for resuming")
    # unset: None, so that _cmd_relabel can tell --weights given with another --fusion
    add_options(rl, RelabelConfig, fusion={"default": None}, weights={"default": None})
    add_options(rl, RetrieveConfig)
    rl.add_argument("--limit", type=int, default=None, help="only the first N generated queries")
    rl.set_defaults(func=_cmd_relabel)


def _add_rerank_eval(commands, llm) -> None:
    from gecko.relabel import RelabelConfig
    from gecko.retrieve import RetrieveConfig

    rr = commands.add_parser("rerank-eval", parents=[_pair_scoring(llm), _beir()],
                             help="nDCG@10 of the retriever vs re-ranked by QL / RC / RRF on a BEIR dataset")
    add_options(rr, RelabelConfig, ["top_n"])
    add_options(rr, RetrieveConfig, ["embedder", "cache_dir", "device"])  # BEIR queries as they are, a flat index
    rr.add_argument("--dataset", required=True, help="BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], qrels)")
    rr.add_argument("--split", default="test")
    rr.add_argument("--limit", type=int, default=None, help="only the first N judged queries (LLM cost is N x top-N pairs)")
    rr.add_argument("--out", default=None, help="also write the result as JSON here")
    rr.set_defaults(func=_cmd_rerank_eval)


def _add_train(commands, llm) -> None:
    from gecko.train import StageConfig, TrainConfig

    tr = commands.add_parser("train", help="contrastive fine-tuning: in-batch, hard and same-tower negatives, Matryoshka dims")
    tr.add_argument("--config", default=None, help="a TrainConfig as JSON/YAML; command-line options override it")
    tr.add_argument("--corpus", default=None, help="the corpus of relabeled --data: gives the listwise term every candidate's text")
    # unset options leave --config's values; --resume and --progress are the command line's alone
    add_options(tr, TrainConfig, layered=True, resume={"default": False}, progress={"default": True})
    add_options(tr, StageConfig, prefix="pretrain-", layered=True)
    tr.set_defaults(func=_cmd_train)


def _add_encode(commands, llm) -> None:
    enc = commands.add_parser("encode", help="embed a file of texts into .npy (+ ids) or Parquet, streaming")
    enc.add_argument("--model", default=DEFAULT, help="sentence-transformers folder (e.g. from gecko train) or default (packaged MiniLM)")
    enc.add_argument("--input", required=True, help=".txt (one text per line), JSONL(.gz), Parquet, CSV/TSV, BEIR or .txt/.md folder")
    enc.add_argument("--out", required=True, help="OUT.npy (ids in OUT.ids.json) or OUT.parquet (columns id, embedding)")
    enc.add_argument("--dims", type=int, default=None, help="Matryoshka: keep the first N dims, re-normalised (default: all)")
    enc.add_argument("--as", dest="as_", choices=["query", "document"], default=None,
                     help="use the model's saved query / document prompt (default: texts as given)")
    enc.add_argument("--task", default=None, help="embed as queries with the prompt 'task: TEXT | query: '")
    enc.add_argument("--chunk-size", type=int, default=8192, help="texts read, sorted by length and written at a time (bounds memory)")
    enc.add_argument("--text-field", default=None, help="text column / JSON field (default: text)")
    enc.add_argument("--id-field", default=None, help="id column / JSON field (default: _id or id)")
    enc.add_argument("--lenient", action="store_true", help="skip and count bad records instead of failing")
    enc.add_argument("--summary-json", action="store_true", help=SUMMARY_JSON)
    enc.set_defaults(func=_cmd_encode)


def _add_serve(commands, llm) -> None:
    from gecko.serve import ServeConfig

    sv = commands.add_parser("serve", help="OpenAI-compatible /v1/embeddings and /v1/search over HTTP")
    add_options(sv, ServeConfig)
    sv.set_defaults(func=_cmd_serve)


def main(argv: list[str] | None = None) -> int:
    from gecko.corpus import CorpusError
    from gecko.llm import LLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "engine", "ray") == "local" and (args.ray_address or args.actors):
        parser.error("--ray-address and --actors need --engine ray")
    try:  # bad input (settings, files, specs): the commands' errors are ValueErrors, reported here as one line
        return args.func(args)
    except (CorpusError, LLMError, FileNotFoundError, ValueError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        print(f"gecko: error: {missing_module_message(err.name or str(err))}", file=sys.stderr)
        return 2


# optional extras of pyproject.toml, by the top-level module each brings
EXTRAS = {"mteb": "mteb", "ray": "ray"}


def missing_module_message(module: str) -> str:
    """One line naming what to install for a module this install lacks."""
    top = module.split(".")[0]
    if top in EXTRAS:
        return f"this needs the optional '{EXTRAS[top]}' extra (module {top!r} is not installed): pip install 'gecko[{EXTRAS[top]}]'"
    return f"module {top!r} is not installed; reinstall gecko (pip install -e .) to get its dependencies"


if __name__ == "__main__":
    sys.exit(main())
