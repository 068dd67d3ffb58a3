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

    config = GenerateConfig(
        task_types=tuple(args.task_types or GenerateConfig.task_types),
        per_passage=args.per_passage,
        seed=args.seed,
        max_attempts=args.max_attempts,
        temperature=args.temperature,
        prompt_style=args.prompt_style,
        batch_size=args.batch_size,
    )
    if args.engine == "ray":  # its errors are LLMErrors, reported by main
        from gecko.scale import run_generate_ray

        summary = run_generate_ray(args.corpus, args.out, args.llm, config, _ray_config(args), limit=args.limit,
                                   lenient=args.lenient, progress=not args.summary_json)
    else:
        llm = _load_llm(args)
        summary = run_generate(args.corpus, args.out, llm, config, limit=args.limit, lenient=args.lenient, progress=not args.summary_json)
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _load_llm(args: argparse.Namespace):
    """The stage's LLM with the cost options (`--price`, `--max-cost`, `--batch`) of generate and relabel."""
    from gecko.llm import Price, load_llm

    prices = {}
    if args.price:
        try:
            given = Price(*(float(v) for v in args.price.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"--price {args.price!r}: expected INPUT,OUTPUT US dollars per million tokens, e.g. 0.15,0.6") from None
        prices = {args.llm.rpartition("#")[2] or args.llm: given}
    return load_llm(args.llm, prices=prices, max_cost=args.max_cost, **({"batch": True} if args.batch else {}))


def _ray_config(args: argparse.Namespace):
    from gecko.scale import RayConfig

    return RayConfig(address=args.ray_address, actors=args.actors)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gecko.demo import run_demo
    from gecko.pipeline import ConfigError, PipelineError

    try:
        run_demo(out_dir=args.out, overrides=args.overrides, progress=not args.no_progress)
    except (ConfigError, PipelineError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from gecko.pipeline import ConfigError, PipelineError, load_config, run_pipeline, start_in_background

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
    except (ConfigError, PipelineError, ValueError) as err:  # the stages' input errors are ValueErrors
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


def _relabel_score_config(args: argparse.Namespace):
    from gecko.relabel import ScoreConfig

    relevant, sep, other = args.labels.partition("/")
    if not sep or not relevant.strip() or not other.strip():
        raise ValueError(f"--labels {args.labels!r}: expected RELEVANT/OTHER, e.g. Yes/No")
    return ScoreConfig(
        prompt_style=args.prompt_style,
        labels=(" " + relevant.strip(), " " + other.strip()),
        max_passage_words=args.max_passage_words,
        ql_norm=args.ql_norm,
        rc_score=args.rc_score,
    )


def _cmd_relabel(args: argparse.Namespace) -> int:
    from gecko.corpus import CorpusError
    from gecko.evaluate.tasks import EvalError
    from gecko.relabel import RelabelConfig, run_relabel
    from gecko.retrieve import RetrieveConfig

    try:
        retrieve = RetrieveConfig(
            embedder=args.embedder, index=args.index, nprobe=args.nprobe, query_format=args.query_format,
            document_format=args.document_format, cache_dir=args.cache_dir, device=args.device,
        )
        if args.weights and args.fusion not in (None, "weighted"):
            raise ValueError(f"--weights applies to --fusion weighted, not {args.fusion}")
        fusion = {"fusion": args.fusion} if args.fusion else {}
        if args.weights:
            fusion["weights"] = args.weights
        config = RelabelConfig(
            **fusion, top_n=args.top_n, positive=args.positive, negative=args.negative, n_negatives=args.negatives,
            seed=args.seed, drop_easy_margin=args.drop_easy_margin, query_chunk=args.query_chunk,
            false_negative_ratio=args.false_negative_ratio, false_negative_ql_margin=args.false_negative_ql_margin,
            score=_relabel_score_config(args), retrieve=retrieve,
        )
        if args.engine == "ray":
            from gecko.scale import run_relabel_ray

            summary = run_relabel_ray(args.generated, args.corpus, args.out, args.llm, config, _ray_config(args),
                                      limit=args.limit, progress=not args.summary_json)
        else:
            summary = run_relabel(args.generated, args.corpus, args.out, _load_llm(args), config, limit=args.limit,
                                  progress=not args.summary_json)
    except CorpusError:
        raise  # file:line problems: reported by main
    except (ValueError, EvalError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _cmd_rerank_eval(args: argparse.Namespace) -> int:
    from gecko.corpus import CorpusError
    from gecko.evaluate.tasks import EvalError
    from gecko.journal import write_json_atomic
    from gecko.llm import load_llm
    from gecko.relabel import run_rerank_eval
    from gecko.retrieve import RetrieveConfig

    try:
        retrieve = RetrieveConfig(embedder=args.embedder, query_format="{query}", cache_dir=args.cache_dir, device=args.device)
        score = _relabel_score_config(args)
        llm = load_llm(args.llm)
        result = run_rerank_eval(args.dataset, llm, top_n=args.top_n, limit=args.limit, split=args.split, score=score,
                                 retrieve=retrieve, progress=not args.summary_json, **_beir_options(args))
    except CorpusError:
        raise
    except (ValueError, EvalError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_json_atomic(args.out, result.to_dict())
    print(json.dumps(result.to_dict()) if args.summary_json else result.render())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from gecko.evaluate.tasks import EvalError
    from gecko.train import DataSpec, StageConfig, TrainConfig, TrainDataError, TrainError, train

    try:
        fields = TrainConfig.read_file(args.config) if args.config else {}
        given = {
            "data": [DataSpec.parse(d) for d in args.data] if args.data else None, "out": args.out, "base": args.base,
            "dims": [int(d) for d in args.dims.replace(",", " ").split()] if args.dims else None,
            "epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "warmup": args.warmup, "max_seq_length": args.max_seq_length, "temperature": args.temperature,
            "same_tower": False if args.no_same_tower else None, "prompts": False if args.no_prompts else None,
            "hard_negatives": args.hard_negatives,
            "homogeneous": True if args.homogeneous else None, "examples_per_epoch": args.examples_per_epoch,
            "mini_batch_size": args.mini_batch_size, "save_steps": args.save_steps, "logging_steps": args.logging_steps,
            "seed": args.seed, "eval_tasks": args.eval_task, "eval_baseline": True if args.eval_baseline else None,
            "device": args.device, "precision": args.precision, "keep_checkpoints": True if args.keep_checkpoints else None,
            "distill_weight": args.distill_weight, "distill_teacher": args.distill_teacher,
            "distill_temperature": args.distill_temperature, "distill_list": args.distill_list,
        }
        if args.corpus and given["data"]:
            for spec in given["data"]:
                spec.corpus = spec.corpus or args.corpus
        fields.update({k: v for k, v in given.items() if v is not None})
        if args.pretrain_data:
            fields["pretrain"] = StageConfig(data=[DataSpec.parse(d) for d in args.pretrain_data], steps=args.pretrain_steps,
                                             epochs=args.pretrain_epochs or 1.0)
        fields.update(resume=args.resume, progress=not args.no_progress)
        if not fields.get("data") or not fields.get("out"):
            raise ValueError("--data and --out are required (or give them in --config)")
        path = train(TrainConfig.from_dict(fields))
    except (ValueError, TrainDataError, TrainError, EvalError) as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: printed once
        print(f"model: {path}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from gecko.encode import EncodeError, encode_file

    try:
        summary = encode_file(args.input, args.out, args.model, dims=args.dims, as_=args.as_, task=args.task,
                              chunk_size=args.chunk_size, lenient=args.lenient, text_field=args.text_field,
                              id_field=args.id_field, progress=not args.summary_json)
    except EncodeError as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict()) if args.summary_json else summary.render())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from gecko.encode import EncodeError
    from gecko.serve import ServeConfig, run_server

    config = ServeConfig(
        model=args.model, host=args.host, port=args.port, corpus=args.corpus,
        api_key=args.api_key or os.environ.get("GECKO_API_KEY") or None, max_inputs=args.max_inputs,
        max_chars=args.max_chars, device=args.device, cache_dir=args.cache_dir,
    )
    try:
        run_server(config)
    except EncodeError as err:
        print(f"gecko: error: {err}", file=sys.stderr)
        return 2
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
    engine = argparse.ArgumentParser(add_help=False)  # where the LLM work runs: generate and relabel
    engine.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: LLM batches on Ray actors, output a folder of shards + manifest.json (pip install 'gecko[ray]')")
    engine.add_argument("--ray-address", default=None, help="with --engine ray: 'auto' or HOST:PORT (default: RAY_ADDRESS or a local Ray)")
    engine.add_argument("--actors", type=int, default=None, help="with --engine ray: LLM actors (default: one per cluster CPU)")
    cost = argparse.ArgumentParser(add_help=False)  # what the LLM work may cost: generate and relabel
    cost.add_argument("--price", default=None, metavar="INPUT,OUTPUT",
                      help="US dollars per million prompt, generated tokens of --llm: the summary estimates the cost")
    cost.add_argument("--max-cost", type=float, default=None,
                      help="stop (cleanly, journaled) before the next LLM call once the estimate reaches this; needs --price")
    cost.add_argument("--batch", action="store_true", help="openai: send the calls through OpenAI's Batch API (half the price, slower)")
    gen = commands.add_parser("generate", parents=[engine, cost], help="FRet step 1: the LLM writes a task and a query per passage")
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

    demo = commands.add_parser("demo", help="the whole recipe on the bundled SciFact sample with the packaged models (minutes)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override the bundled config, e.g. relabel.top_n=5")
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    demo.set_defaults(func=_cmd_demo)

    run = commands.add_parser("run", help="generate -> relabel -> train -> eval from one YAML config; reruns skip finished stages")
    run.add_argument("config", help="YAML config (see configs/scifact.yaml)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted keys, values read as YAML, e.g. relabel.top_n=10 train.epochs=2 eval.dims=[384,64]")
    run.add_argument("--show-config", action="store_true", help="print the config with every default filled in, and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    run.add_argument("--background", action="store_true",
                     help="start the run as its own process (outlives the shell; log in RUN_DIR/run.log) and return")
    run.set_defaults(func=_cmd_run)

    from gecko.evaluate.encoder import PROMPT_MODES
    from gecko.train.data import TEACHERS
    from gecko.evaluate.tasks import IDENTICAL_IDS, RetrievalTask

    beir = argparse.ArgumentParser(add_help=False)  # how a BEIR folder is scored: eval and rerank-eval
    beir.add_argument("--ignore-identical-ids", choices=list(IDENTICAL_IDS),
                      default=next(k for k, v in IDENTICAL_IDS.items() if v is RetrievalTask.ignore_identical_ids),
                      help="leave a query's own document (same id) out of its ranking; auto (default): as mteb's task of "
                      "that name, else yes when query ids occur in the corpus (BEIR's default)")
    beir.add_argument("--strict", action="store_true", default=RetrievalTask.strict,
                      help="refuse qrels that name documents absent from the corpus (default: report them and score "
                      "them as pytrec_eval does)")
    ev = commands.add_parser("eval", parents=[beir], help="MTEB-style scores at each Matryoshka dim, with a report")
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
    ev.add_argument("--cache-dir", default=None, help="embedding cache (default: $GECKO_HOME/embeddings)")
    ev.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)

    pair = argparse.ArgumentParser(add_help=False)  # LLM pair-scoring options shared by relabel and rerank-eval
    pair.add_argument("--llm", default=DEFAULT, help="default | llamacpp:PATH.gguf | openai:URL#MODEL | transformers:DIR")
    pair.add_argument("--embedder", default=DEFAULT, help="retriever: sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    pair.add_argument("--top-n", type=int, default=20, help="candidates retrieved and re-ranked per query")
    pair.add_argument("--prompt-style", choices=["joint", "ql", "rc-query-first"], default="joint",
                      help="joint: QL and RC from one pass per candidate; ql: QL only; rc-query-first: RC only")
    pair.add_argument("--labels", default="Yes/No", help="RC labels RELEVANT/OTHER (one word each)")
    pair.add_argument("--ql-norm", choices=["sum", "mean"], default="sum", help="QL: sum of query token log-probs, or per token")
    pair.add_argument("--rc-score", choices=["logodds", "yes"], default="logodds",
                      help="RC: log P(relevant) - log P(other), or log P(relevant) alone")
    pair.add_argument("--max-passage-words", type=int, default=200, help="passages are cut to this many words in LLM prompts")
    pair.add_argument("--cache-dir", default=None, help="embedding cache (default: $GECKO_HOME/embeddings)")
    pair.add_argument("--device", default=None, help="torch device for the embedder")
    pair.add_argument("--summary-json", action="store_true", help="print the summary as JSON, no progress bar")

    rl = commands.add_parser("relabel", parents=[pair, engine, cost],
                             help="FRet step 2: retrieve top-N, re-rank with the LLM (QL + RC), pick positive and hard negative")
    rl.add_argument("--generated", required=True, help="generated.jsonl from `gecko generate`")
    rl.add_argument("--corpus", required=True, help="the corpus the queries were generated from (and are retrieved in)")
    rl.add_argument("--out", required=True, help="output .jsonl or .parquet; OUT.journal holds progress for resuming")
    rl.add_argument("--fusion", choices=["rrf", "ql", "rc", "weighted"], default=None,
                    help="rrf: 1/rank_QL + 1/rank_RC (the paper); ql / rc alone; weighted: sum of weight/rank "
                    "(default: weighted with ql=1,retriever=1, chosen by rerank-eval for the packaged model, see README)")
    rl.add_argument("--weights", default=None, help="for --fusion weighted (default ql=1,retriever=1), e.g. ql=1,rc=1,retriever=1")
    rl.add_argument("--positive", choices=["fused", "seed"], default="fused",
                    help="fused: the top re-ranked candidate (the recipe); seed: the seed passage (ablation)")
    rl.add_argument("--negative", choices=["last", "random"], default="last", help="hard negative: rank N, or a random one of ranks 2..N")
    rl.add_argument("--negatives", type=int, default=1, help="hard negatives per example")
    rl.add_argument("--seed", type=int, default=0, help="for --negative random")
    rl.add_argument("--false-negative-ratio", type=float, default=None,
                    help="never a negative: a candidate the retriever scores above this share of the positive's score (e.g. 0.95)")
    rl.add_argument("--false-negative-ql-margin", type=float, default=None,
                    help="never a negative: a candidate whose QL is within this many nats of the positive's")
    rl.add_argument("--drop-easy-margin", type=float, default=None,
                    help="drop examples whose seed the base retriever ranks first by at least this cosine margin (off by default)")
    rl.add_argument("--index", choices=["flat", "ivf", "ivfpq"], default="flat", help="flat: exact inner product; ivf / ivfpq: approximate")
    rl.add_argument("--nprobe", type=int, default=32, help="ivf cells searched per query")
    rl.add_argument("--query-format", default="{task} {query}", help="retriever input for a query (fields {task}, {query})")
    rl.add_argument("--document-format", default="{title} {text}", help="retriever input for a passage (fields {title}, {text})")
    rl.add_argument("--query-chunk", type=int, default=4096,
                    help="queries retrieved and scored together: bounds memory; passages shared within a chunk are evaluated once")
    rl.add_argument("--limit", type=int, default=None, help="only the first N generated queries")
    rl.set_defaults(func=_cmd_relabel)

    rr = commands.add_parser("rerank-eval", parents=[pair, beir],
                             help="nDCG@10 of the retriever vs re-ranked by QL / RC / RRF on a BEIR dataset")
    rr.add_argument("--dataset", required=True, help="BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], qrels)")
    rr.add_argument("--split", default="test")
    rr.add_argument("--limit", type=int, default=None, help="only the first N judged queries (LLM cost is N x top-N pairs)")
    rr.add_argument("--out", default=None, help="also write the result as JSON here")
    rr.set_defaults(func=_cmd_rerank_eval)

    tr = commands.add_parser("train", help="contrastive fine-tuning: in-batch, hard and same-tower negatives, Matryoshka dims")
    tr.add_argument("--data", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                    help="repeatable: examples .jsonl/.parquet (task, query, positive[, negative]), an STS folder/.tsv, "
                    "a classification folder/.csv or a BEIR folder (train qrels); WEIGHT = uses per example per epoch (default 1)")
    tr.add_argument("--out", help="output folder: the trained sentence-transformers model, card, loss plot")
    tr.add_argument("--base", default=None, help="model to start from: sentence-transformers folder or default (packaged MiniLM)")
    tr.add_argument("--config", default=None, help="a TrainConfig as JSON/YAML; command-line options override it")
    tr.add_argument("--dims", default=None, help="Matryoshka dims, e.g. 384,256,128,64 (default: full, 256, 128, 64)")
    tr.add_argument("--epochs", type=float, default=None, help="default 1")
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    tr.add_argument("--batch-size", type=int, default=None, help="per device (default 32)")
    tr.add_argument("--lr", type=float, default=None, help="default 2e-5")
    tr.add_argument("--warmup", type=float, default=None, help="warm-up: fraction of steps (< 1) or steps (default 0.1)")
    tr.add_argument("--max-seq-length", type=int, default=None, help="tokens per text (default: the base model's)")
    tr.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 0.05)")
    tr.add_argument("--no-same-tower", action="store_true", help="leave the other queries out of the denominator")
    tr.add_argument("--no-prompts", action="store_true",
                    help="train on plain texts, without Gecko's task prompts, and save none (as MTEB embeds a prompt-less base)")
    tr.add_argument("--hard-negatives", choices=["own", "batch", "none"], default=None,
                    help="own: each query's own (the paper, default); batch: every row's; none: ignore negatives")
    tr.add_argument("--homogeneous", action="store_true", help="every batch from one data source")
    tr.add_argument("--examples-per-epoch", type=int, default=None, help="rescale the weighted mixture to this many")
    tr.add_argument("--mini-batch-size", type=int, default=None, help="GradCache: embed this many rows at a time (large batches)")
    tr.add_argument("--corpus", default=None, help="the corpus of relabeled --data: gives the listwise term every candidate's text")
    tr.add_argument("--distill-weight", type=float, default=None,
                    help="weight of the listwise KL(LLM teacher || student) term over each query's candidates (default 0: off)")
    tr.add_argument("--distill-teacher", choices=list(TEACHERS), default=None, help="the teacher's score (default ql)")
    tr.add_argument("--distill-temperature", type=float, default=None, help="the teacher's softmax temperature (default 5)")
    tr.add_argument("--distill-list", type=int, default=None, help="texts per query in the KL term (default 8)")
    tr.add_argument("--pretrain-data", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                    help="repeatable: pre-finetuning stage on pairs, in-batch negatives only, before fine-tuning")
    tr.add_argument("--pretrain-steps", type=int, default=None)
    tr.add_argument("--pretrain-epochs", type=float, default=None)
    tr.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default 100)")
    tr.add_argument("--logging-steps", type=int, default=None, help="log the loss every N steps (default 10)")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--eval-task", action="append", default=None, metavar="NAME=PATH",
                    help="repeatable: score the trained model with gecko eval after training (numbers go in the card)")
    tr.add_argument("--eval-baseline", action="store_true", help="also score the base model (a delta column in the card)")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None)
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/.train (checkpoints) after finishing")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

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
    enc.add_argument("--summary-json", action="store_true", help="print the summary as JSON, no progress bar")
    enc.set_defaults(func=_cmd_encode)

    sv = commands.add_parser("serve", help="OpenAI-compatible /v1/embeddings and /v1/search over HTTP")
    sv.add_argument("--model", default=DEFAULT, help="sentence-transformers folder or default (packaged MiniLM)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--corpus", default=None, help="corpus indexed at start for POST /v1/search")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (prefer env GECKO_API_KEY: flags show in ps)")
    sv.add_argument("--max-inputs", type=int, default=256, help="inputs per request (413 above)")
    sv.add_argument("--max-chars", type=int, default=16384, help="characters per input (422 above)")
    sv.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    sv.add_argument("--cache-dir", default=None, help="corpus embedding cache (default: $GECKO_HOME/embeddings)")
    sv.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gecko.corpus import CorpusError
    from gecko.llm import LLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "engine", "ray") == "local" and (args.ray_address or args.actors):
        parser.error("--ray-address and --actors need --engine ray")
    try:
        return args.func(args)
    except (CorpusError, LLMError, FileNotFoundError, ValueError) as err:  # bad input: settings, files, specs
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
