"""`minigpt` command line: train, generate, eval, export.

Torch is imported inside the commands, not here, so `--help` is instant.
Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
import time

from minigpt.config import COUNT, DRAFT_TOKENS, MOST_DRAFT_TOKENS, POSITIVE, SEED, Bounded
from minigpt.errors import MiniGPTError

EXIT_USAGE = 2
DEFAULT_CHECKPOINT = "minigpt.safetensors"
DEFAULT_METRICS = "minigpt.metrics.jsonl"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage too; keep it to one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _option(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Add --name (and --aliases), dashed (--max-new-tokens); the underscore spelling works too, unlisted."""
    words = (name, *aliases)
    parser.add_argument(*[f"--{word.replace('_', '-')}" for word in words], dest=name, **kwargs)
    underscored = [f"--{word}" for word in words if "_" in word]
    if underscored:
        parser.add_argument(*underscored, dest=name, **{**kwargs, "help": argparse.SUPPRESS,
                                                         "default": argparse.SUPPRESS})
    if kwargs.get("action") is argparse.BooleanOptionalAction:  # --no-verify's spelling with underscores too
        for word in words:
            parser.add_argument(f"--no_{word}", dest=name, action="store_false", help=argparse.SUPPRESS,
                                default=argparse.SUPPRESS)


def _dataclass_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One option per dataclass field, typed, explained and defaulted by the field itself.

    The parsed value is None when the flag is not given, so `--resume` can tell what was asked for.
    """
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = type(f.default)
        _option(parser, f.name, type=f.metadata.get("bounds") or kind, default=None, metavar=kind.__name__.upper(),
                help=f"{f.metadata['help']} (default {f.default})")


def _given(args: argparse.Namespace, cls, skip=()) -> dict:
    """The fields of `cls` set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """The model and how to run it: the same flags wherever a model is run (generate, serve)."""
    _option(parser, "checkpoint", "model", default=DEFAULT_CHECKPOINT, metavar="PATH",
            help=f"a checkpoint, an exported .onnx model, or an export --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(parser, "engine", choices=("auto", "torch", "onnx"), default="auto",
            help="torch, or onnx (onnxruntime); auto picks onnx for a .onnx file (default auto)")
    _option(parser, "attention", choices=("auto", "torch", "triton"), default="auto",
            help="attention kernels of the torch engine: triton (our fused kernels, GPU), torch (PyTorch SDPA), "
                 "auto (Triton on a GPU, PyTorch otherwise) (default auto)")
    _option(parser, "device", default="auto", help="auto, cpu or cuda; the onnx engine runs on the CPU "
            "(default auto)")
    _option(parser, "threads", type=POSITIVE, default=None, metavar="N",
            help="CPU threads; both engines pick 1 for one sample of a small model (under 4 MB of weights) "
                 "and every core otherwise, as measured fastest (see bench/README.md) (default picked)")
    _option(parser, "draft", type=_draft_choice, default="auto", metavar="DRAFT",
            help="speculative decoding, the same text faster: ngram guesses from the table minigpt train stores "
                 "with the model, context from the text so far, auto the table when the model has one, a "
                 "smaller model's .safetensors or .onnx file (same characters) guesses with that model, none "
                 "decodes one token a step (default auto)")
    _option(parser, "draft_tokens", type=Bounded(int, 1, MOST_DRAFT_TOKENS), default=DRAFT_TOKENS, metavar="K",
            help="the most guesses verified in one step; fewer where the draft is unsure or, for guesses it "
                 "cannot vouch for (sampled ones, context lookup, a draft model), after a miss "
                 f"(default {DRAFT_TOKENS})")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minigpt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt", description="Train, sample and evaluate a character-level GPT.")
    parser.add_argument("--version", action="version", version=f"minigpt {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_generate, _add_serve, _add_plot, _add_attention, _add_eval, _add_export):
        add(commands)
    return parser


def _add_train(commands) -> None:
    from minigpt.config import GPTConfig, TrainConfig  # dataclasses only: no torch

    train = commands.add_parser("train", help="train a model and save a checkpoint",
                                description="Train a MiniGPT, save it, then print a sample.")
    _option(train, "data", default=None, metavar="PATH",
            help="a text file (its last 10%% is validation), a folder with wiki.{train,valid,test}.raw, "
                 "wiki.{train,valid,test}.tokens or {train,valid,test}.txt, or hf:NAME[:CONFIG], a HuggingFace "
                 "text dataset (default WikiText-2 from the hub, or an offline fallback corpus)")
    _option(train, "out", default=None, metavar="PATH",
            help="the checkpoint to write; its log NAME.metrics.jsonl goes beside it "
                 f"(default {DEFAULT_CHECKPOINT}, or with --resume the checkpoint resumed)")
    model_group = train.add_argument_group("model")
    _dataclass_options(model_group, GPTConfig, skip=("vocab_size",))
    train_group = train.add_argument_group("training")
    _dataclass_options(train_group, TrainConfig)
    _option(train, "threads", type=POSITIVE, default=None, metavar="N",
            help="CPU threads; on a machine busy with other work 1 can be twice as fast (default every core)")
    _option(train, "resume", default=None, metavar="CKPT",
            help="continue a checkpoint written by minigpt train: model, optimizer, step and training settings "
                 "come back; training flags given with it override them")
    _option(train, "text_column", default="text", metavar="NAME",
            help="with --data hf:NAME[:CONFIG], the dataset's column of text (default text)")
    _option(train, "cache_dir", default=None, metavar="DIR",
            help="where encoded data is kept (default $XDG_CACHE_HOME/minigpt or ~/.cache/minigpt)")
    _option(train, "init_from", default=None, metavar="CKPT",
            help="start a new run from a checkpoint's tensors wherever name and shape match (token embedding "
                 "rows by character): a deeper model, another corpus")
    _option(train, "compile", action="store_true",
            help="run the training step through torch.compile (on a CPU it needs a C++ compiler; see bench/README.md "
                 "for what it buys)")
    _option(train, "force", action="store_true",
            help="replace an existing --out (a trained model is never replaced without it)")
    _option(train, "sample_tokens", type=COUNT, default=300, metavar="N",
            help="characters to sample at the end (default 300)")
    _option(train, "quiet", action="store_true", help="no progress bar")


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="continue a prompt with a trained model",
                                   description="Print the prompt and its continuation; diagnostics go to stderr.")
    _engine_options(generate)
    _option(generate, "prompt", default="", help="text to continue (default empty: starts a new line)")
    _option(generate, "max_new_tokens", type=COUNT, default=200, metavar="N", help="characters to add (default 200)")
    _option(generate, "temperature", type=Bounded(float, 0), default=1.0, metavar="T", help="0 is greedy (default 1.0)")
    _option(generate, "top_k", type=POSITIVE, default=None, metavar="K",
            help="sample only among the k likeliest characters (default off)")
    _option(generate, "top_p", type=Bounded(float, 0, 1), default=None, metavar="P",
            help="sample from the smallest set of characters holding this much probability (default off)")
    _option(generate, "seed", type=SEED, default=None, help="same seed, same text (default random)")
    _option(generate, "num_samples", type=POSITIVE, default=1, metavar="N",
            help="samples of the same prompt, decoded together as one batch (default 1)")
    _option(generate, "kv_cache", action=argparse.BooleanOptionalAction, default=True,
            help="keep earlier keys and values in a static cache; --no-kv-cache recomputes the whole context "
                 "every step (the reference) (default on)")


def _draft_choice(value: str) -> str:
    from minigpt.speculative import DRAFT_CHOICES

    if value in DRAFT_CHOICES or value.endswith((".safetensors", ".onnx")):
        return value
    raise argparse.ArgumentTypeError(f"choose auto, ngram, context or none, or give a smaller model's "
                                     f".safetensors or .onnx file; got {value!r}")


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="serve a model over HTTP with OpenAI's completions API",
                                description="Serve a model to many callers at once (continuous batching) through "
                                            "OpenAI's /v1/completions API; Ctrl-C or SIGTERM stops it gracefully.")
    _engine_options(serve)
    serve.set_defaults(kv_cache=True)
    _option(serve, "host", default="127.0.0.1",
            help="address to listen on; 0.0.0.0 is reachable from other machines (default 127.0.0.1)")
    _option(serve, "port", type=Bounded(int, 1, 65535), default=8000, help="(TCP) port to listen on (default 8000)")
    _option(serve, "max_batch", type=POSITIVE, default=32, metavar="N",
            help="rows decoded together; requests beyond them wait in the queue (default 32)")
    _option(serve, "max_queue", type=POSITIVE, default=256, metavar="N",
            help="requests that may wait for rows; one more gets 429 (default 256)")
    _option(serve, "max_tokens", type=POSITIVE, default=4096, metavar="N",
            help="the largest max_tokens a request may ask for (default 4096)")
    _option(serve, "max_connections", type=POSITIVE, default=512, metavar="N",
            help="connections open at once; one more is answered 503 and closed (default 512)")
    _option(serve, "read_timeout", type=Bounded(float, high=3600, above=0), default=10.0, metavar="SECONDS",
            help="how long a request's headers, and then its body, may take to arrive; slower ones get 408 "
                 "(default 10)")
    _option(serve, "api_key", default=None, metavar="KEY",
            help="require 'Authorization: Bearer KEY' on /v1 (default $MINIGPT_API_KEY, or no key)")
    _option(serve, "shutdown_timeout", type=Bounded(float, 0, 3600), default=10.0, metavar="SECONDS",
            help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish before they are "
                 "cancelled (default 10)")


def _add_plot(commands) -> None:
    plot = commands.add_parser("plot", help="draw training curves, or a benchmark chart",
                               description="Draw loss (nats and bits per character) and learning rate against "
                                           "step from one or more NAME.metrics.jsonl, or tokens/s per engine from "
                                           "pytest-benchmark JSON (--bench).")
    _option(plot, "metrics", nargs="+", default=None, metavar="PATH",
            help=f"metrics logs of runs to draw together (default {DEFAULT_METRICS})")
    _option(plot, "bench", default=None, metavar="JSON",
            help="draw this pytest-benchmark JSON (pytest bench/ --benchmark-json=FILE) instead")
    _option(plot, "out", default=None, metavar="PATH",
            help="the picture, .png or .svg (default curves.png, or bench.png with --bench)")
    _option(plot, "force", action="store_true", help="replace an existing picture at --out")


def _add_attention(commands) -> None:
    attention = commands.add_parser("attention", help="draw what the model's attention heads look at",
                                    description="Draw the model's attention weights for a prompt: every layer and "
                                                "head, one layer (--layer), one head (--head), or one map (both).")
    _option(attention, "checkpoint", default=DEFAULT_CHECKPOINT, metavar="PATH",
            help=f"a checkpoint or an export --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(attention, "prompt", required=True, help="the text whose attention to draw")
    _option(attention, "layer", type=COUNT, default=None, metavar="L", help="only this layer (from 0)")
    _option(attention, "head", type=COUNT, default=None, metavar="H", help="only this head (from 0)")
    _option(attention, "out", default="attention.png", metavar="PATH",
            help="the picture, .png or .svg (default attention.png)")
    _option(attention, "force", action="store_true", help="replace an existing picture at --out")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss and bits per character on a whole split",
                                   description="Evaluate a checkpoint on every character of one split.")
    _option(evaluate, "checkpoint", default=DEFAULT_CHECKPOINT,
            help=f"the checkpoint to measure, or an export --hf folder (default {DEFAULT_CHECKPOINT})")
    _option(evaluate, "data", default=None, help="text file or folder (default: the data it was trained on)")
    _option(evaluate, "split", choices=("valid", "test"), default="valid",
            help="which split to measure, every character of it (default valid)")
    _option(evaluate, "cache_dir", default=None, metavar="DIR",
            help="where encoded data is kept (default $XDG_CACHE_HOME/minigpt or ~/.cache/minigpt)")
    _option(evaluate, "batch_size", type=POSITIVE, default=64, help="windows per forward pass (default 64)")
    _option(evaluate, "device", default="auto", help="auto, cpu or cuda (default auto)")
    _option(evaluate, "threads", type=POSITIVE, default=None, metavar="N", help="CPU threads (default every core)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="export a checkpoint to ONNX or a HuggingFace directory",
                                 description="Export a checkpoint to one ONNX graph for onnxruntime (--onnx) or "
                                             "to a transformers GPT-2 directory (--hf), verified first.")
    formats = export.add_mutually_exclusive_group()
    _option(formats, "onnx", action="store_true", help="one ONNX graph, its KV-cache updated in place")
    _option(formats, "hf", action="store_true",
            help="a transformers GPT-2 directory with a character-level tokenizer (pip install 'minigpt[hf]')")
    _option(export, "checkpoint", default=DEFAULT_CHECKPOINT,
            help=f"a checkpoint or an exported --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(export, "out", default=None, help="what to write (default minigpt.onnx, or the folder minigpt-hf)")
    _option(export, "opset", type=Bounded(int, 13), default=None,
            help="ONNX opset of the standard operators (default 17)")
    _option(export, "quantize", choices=("int8",), default=None, help="int8: dynamic quantisation of the weights")
    _option(export, "verify", action=argparse.BooleanOptionalAction, default=True,
            help="check the graph and compare it with PyTorch (default); --no-verify skips it")
    _option(export, "force", action="store_true", help="overwrite an existing --out")

def _train(args: argparse.Namespace) -> int:
    from minigpt.config import GPTConfig, TrainConfig
    from minigpt.train import TrainingInterrupted, plan_training, run_training, sample_after_training

    _use_threads(args.threads)
    if args.warmup is not None and args.warmup > (args.steps or TrainConfig.steps):
        raise MiniGPTError(f"--warmup {args.warmup} is longer than the run ({args.steps or TrainConfig.steps} "
                           "steps): the learning rate would never reach its peak; lower --warmup or raise --steps")

    plan = plan_training(args.out or args.resume or DEFAULT_CHECKPOINT, data=args.data,
                         config=_given(args, TrainConfig), resume=args.resume, init_from=args.init_from,
                         force=args.force, compile=args.compile, cache_dir=args.cache_dir,
                         text_column=args.text_column, **_given(args, GPTConfig, skip=("vocab_size",)))
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = run_training(plan, progress=not args.quiet)
    except TrainingInterrupted as stop:
        if is_main:  # settings, data and the steps to reach all come back from the checkpoint
            print(f"minigpt: {stop}; saved {stop.path}. Resume with: {_resume_command(stop.path)}", file=sys.stderr)
        return 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
    if not is_main:
        return 0
    print(f"minigpt: trained to step {plan.config.steps} in {result.wall_s:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s); saved {plan.out}", file=sys.stderr)
    if args.sample_tokens > 0:
        print(f"minigpt: sample ({args.sample_tokens} characters, temperature 0.8):", file=sys.stderr)
        print(sample_after_training(result, args.sample_tokens))
    return 0


def _resume_command(path) -> str:
    """The command that continues a run the way it was started: under torchrun, with as many processes (one
    process alone would train on half the batch each step)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return f"torchrun --nproc_per_node={world} -m minigpt train --resume {path}"
    return f"minigpt train --resume {path}"


def _use_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _engine_for(args: argparse.Namespace):
    """(engine, tokenizer, the model's n-gram draft or None) for the flags; the onnx engine never imports
    torch."""
    onnx = args.engine == "onnx" or (args.engine == "auto" and args.checkpoint.endswith(".onnx"))
    if onnx:
        from minigpt.export.onnx_engine import OnnxEngine

        if not args.kv_cache:
            raise MiniGPTError("--no-kv-cache is a torch engine reference; the onnx engine always uses its cache")
        if args.attention != "auto":
            raise MiniGPTError("--attention picks the torch engine's kernels; drop it with --engine onnx")
        if args.device not in ("auto", "cpu"):
            raise MiniGPTError(f"the onnx engine runs on the CPU; drop --device {args.device}, or run the "
                               ".safetensors checkpoint with --engine torch to use a GPU")
        engine = OnnxEngine(args.checkpoint, threads=args.threads)
        return engine, engine.tokenizer, engine.ngram_draft()
    from minigpt.checkpoint import load_checkpoint
    from minigpt.devices import resolve_device, threads_for
    from minigpt.generation import torch_engine

    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    rows = getattr(args, "num_samples", None) or args.max_batch  # what one step decodes: generate's, serve's
    model_bytes = sum(p.numel() * p.element_size() for p in checkpoint.model.parameters())
    _use_threads(args.threads or threads_for(rows, model_bytes))  # as the onnx engine picks them
    checkpoint.model.set_attention_backend(args.attention)
    return torch_engine(checkpoint.model, args.kv_cache), checkpoint.tokenizer, checkpoint.ngram_draft()


def _step_for(args: argparse.Namespace, tokenizer, ngram):
    """The speculative step --draft and --draft-tokens ask for (None for --draft none); a draft model named by
    its file is loaded as the model is, and must use the model's characters."""
    from minigpt.speculative import DRAFT_CHOICES, make_step

    draft_engine = None
    if args.draft not in DRAFT_CHOICES:
        draft_engine, draft_tokenizer, _ = _engine_for(argparse.Namespace(**{**vars(args), "checkpoint": args.draft,
                                                                             "engine": "auto"}))
        if draft_tokenizer.chars != tokenizer.chars:
            raise MiniGPTError(f"the draft model {args.draft} has other characters than the model "
                               f"({len(draft_tokenizer.chars)} against {len(tokenizer.chars)}); a draft model must "
                               "be trained on the same text, or use --draft ngram or context")
    return make_step(args.draft, ngram, args.draft_tokens, draft_engine)


def _generate(args: argparse.Namespace) -> None:
    from minigpt.decoding import join_samples, stream_characters
    from minigpt.fast_sampling import FastSampler

    engine, tokenizer, ngram = _engine_for(args)
    step = _step_for(args, tokenizer, ngram)
    steps = stream_characters(engine, tokenizer, args.prompt, args.max_new_tokens, num_samples=args.num_samples,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              step=step, sampler_type=FastSampler)
    start = time.perf_counter()
    if args.num_samples == 1:  # one sample streams as it is produced
        sys.stdout.write(args.prompt)
        for (piece,) in steps:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:  # a batch finishes together: print each sample whole
        for number, text in enumerate(join_samples(args.prompt, steps, args.num_samples), start=1):
            sys.stdout.write(f"--- sample {number} of {args.num_samples} ---\n{text}\n")
    elapsed = time.perf_counter() - start
    count = args.num_samples * args.max_new_tokens
    speculated = f"; speculative: {step.report()}" if step is not None else ""
    print(f"minigpt: {count} new tokens in {elapsed:.2f} s ({count / max(elapsed, 1e-9):,.0f} tokens/s, "
          f"{type(engine).__name__}{speculated})", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    import socket

    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MiniGPTError(f"minigpt serve needs the serve extra ({exc}): pip install 'minigpt[serve]'") from None
    with socket.socket() as probe:  # a port in use is a one-line error, before the model loads
        # As uvicorn binds: connections of a server just stopped (TIME_WAIT) do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise MiniGPTError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --port "
                               "or --host") from None
    from minigpt.serve import serve
    from minigpt.serve.protocol import Limits, lm_eval_model_args

    engine, tokenizer, ngram = _engine_for(args)
    step = _step_for(args, tokenizer, ngram)
    model_id = Path(args.checkpoint).stem
    print(f"minigpt: serving {model_id!r} ({type(engine).__name__}, {args.max_batch} rows) at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    print(f"minigpt: lm-eval scores it with --model local-completions --model_args "
          f"{lm_eval_model_args(model_id, f'http://{args.host}:{args.port}/v1', tokenizer, engine.block_size)}",
          file=sys.stderr, flush=True)
    limits = Limits(max_batch=args.max_batch, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    max_connections=args.max_connections, read_timeout=args.read_timeout)
    # serve answers SIGTERM and Ctrl-C with a graceful stop, then puts back the handlers it found. Those are
    # ignored ones: a stop asked for again while the process exits (a supervisor repeating it) must not turn a
    # clean exit into death by signal, and Python puts the default back at exit for any handler of its own.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    serve(engine, tokenizer, model_id=model_id, host=args.host, port=args.port, limits=limits,
          api_key=args.api_key or os.environ.get("MINIGPT_API_KEY") or None, shutdown_timeout=args.shutdown_timeout,
          step=step)


def _plot(args: argparse.Namespace) -> None:
    from minigpt import plot

    if args.bench and args.metrics:
        raise MiniGPTError("--bench draws a benchmark, --metrics training curves: give one of them")
    metrics = args.metrics or [DEFAULT_METRICS]
    inputs = [("--bench", args.bench)] if args.bench else [("--metrics", path) for path in metrics]
    out = plot.check_output(args.out or ("bench.png" if args.bench else "curves.png"), force=args.force,
                            inputs=inputs)
    plot.pyplot()  # a missing matplotlib is reported before any file is read
    if args.bench:
        figure = plot.bench_chart(plot.read_bench(args.bench))
    else:
        runs = {}
        for path, label in zip(metrics, plot.run_labels(metrics)):
            records, note = plot.read_metrics(path)
            if note:
                print(f"minigpt: {note}", file=sys.stderr)
            runs[label] = records
        figure = plot.training_curves(runs)
    print(f"minigpt: wrote {plot.save(figure, out)}", file=sys.stderr)


def _attention(args: argparse.Namespace) -> None:
    from minigpt import plot
    from minigpt.checkpoint import load_checkpoint

    out = plot.check_output(args.out, force=args.force, inputs=[("--checkpoint", args.checkpoint)])
    plot.pyplot()
    checkpoint = load_checkpoint(args.checkpoint)
    figure, note = plot.attention_of(checkpoint.model, checkpoint.tokenizer, args.prompt, layer=args.layer,
                                     head=args.head)
    if note:
        print(f"minigpt: drawing {note}", file=sys.stderr)
    print(f"minigpt: wrote {plot.save(figure, out)}", file=sys.stderr)


def _export(args: argparse.Namespace) -> None:
    if args.hf:
        if args.quantize or args.opset is not None:
            raise MiniGPTError("--quantize and --opset belong to --onnx; drop them with --hf")
        from minigpt.export.hf_export import export_hf

        print(export_hf(args.checkpoint, args.out or "minigpt-hf", force=args.force, verify=args.verify))
        return
    if not args.onnx:
        raise MiniGPTError("choose the format to export to: --onnx or --hf")
    from minigpt.export.onnx_export import DEFAULT_OPSET, export_onnx

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    report = export_onnx(args.checkpoint, args.out or "minigpt.onnx", opset=opset, quantize=args.quantize,
                         verify=args.verify, force=args.force)
    print(report)


def _evaluate(args: argparse.Namespace) -> None:
    import math

    import numpy as np

    from minigpt.checkpoint import load_checkpoint
    from minigpt.data import load_corpus, load_recorded_corpus
    from minigpt.decoding import EMPTY_PROMPT
    from minigpt.devices import resolve_device
    from minigpt.training import evaluate_split, split_ids

    _use_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    corpus = (load_corpus(args.data, args.cache_dir) if args.data
              else load_recorded_corpus(checkpoint.metadata, args.cache_dir))
    ids = split_ids(corpus, "".join(checkpoint.tokenizer.chars), args.split, 1)
    if EMPTY_PROMPT in checkpoint.tokenizer:  # every character scored, the first after a newline, as a text begins
        ids = np.concatenate([[checkpoint.tokenizer.id_of(EMPTY_PROMPT)], ids])
    loss = evaluate_split(checkpoint.model, ids, args.batch_size)
    print(f"{args.split}: loss {loss:.4f} nats, {loss / math.log(2):.4f} bits/char "
          f"over {len(ids) - 1:,} characters of {corpus.source}")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that a flag the command does not have is reported by that command, with the
    closest one it has ("--stepz": did you mean --steps?)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices[args.command]
        flags = [flag for action in command._actions for flag in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0].replace("_", "-"), flags, n=1)
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {close[0]}?" if close
                                                                         else ""))
    return args


COMMANDS = {"train": _train, "generate": _generate, "serve": _serve, "eval": _evaluate, "export": _export,
            "plot": _plot, "attention": _attention}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(_build_parser(), argv)
    except SystemExit as exc:  # --help, or a malformed flag already reported in one line
        return exc.code
    try:
        return COMMANDS[args.command](args) or 0
    except MiniGPTError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets it: one says it
            print(f"minigpt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minigpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): end quietly, with cat's status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's final flush cannot fail
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
