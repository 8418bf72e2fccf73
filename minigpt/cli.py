"""`minigpt` command line: train, generate, eval, export.

Torch is imported inside the commands, not here, so `--help` is instant.
Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from minigpt.errors import MiniGPTError

EXIT_USAGE = 2
DEFAULT_CHECKPOINT = "minigpt.safetensors"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage too; keep it to one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _option(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """Add --name (and --aliases), plus the dashed spelling of each multi-word one: both work."""
    flags = []
    for word in (name, *aliases):
        flags += [f"--{word}"] + ([f"--{word.replace('_', '-')}"] if "_" in word else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def _dataclass_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One option per dataclass field, typed and defaulted by the field itself."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = type(f.default)
        _option(parser, f.name, type=kind, default=f.default, metavar=kind.__name__.upper(),
                help=f"(default {f.default})")


def _build_parser() -> argparse.ArgumentParser:
    from minigpt.config import GPTConfig, TrainConfig  # dataclasses only: no torch

    parser = _Parser(prog="minigpt", description="Train, sample and evaluate a character-level GPT.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model and save a checkpoint",
                                description="Train a MiniGPT, save it, then print a sample.")
    _option(train, "data", default=None, help="text file or folder of split files "
            "(default: WikiText-2 from the hub, or an offline fallback corpus)")
    _option(train, "out", default=DEFAULT_CHECKPOINT, help=f"checkpoint to write (default {DEFAULT_CHECKPOINT})")
    model_group = train.add_argument_group("model")
    _dataclass_options(model_group, GPTConfig, skip=("vocab_size",))
    train_group = train.add_argument_group("training")
    _dataclass_options(train_group, TrainConfig)
    _option(train, "resume", default=None, metavar="CKPT",
            help="continue a checkpoint written by minigpt train: model, optimizer and step come back "
                 "(its architecture wins over the model flags); --steps is the total to reach")
    _option(train, "force", action="store_true", help="replace an --out that holds a different model")
    _option(train, "sample_tokens", type=int, default=300, help="characters to sample at the end (default 300)")
    _option(train, "quiet", action="store_true", help="no progress bar")

    generate = commands.add_parser("generate", help="continue a prompt with a trained model",
                                   description="Print the prompt and its continuation; diagnostics go to stderr.")
    _option(generate, "checkpoint", "model", default=DEFAULT_CHECKPOINT,
            help=f"a .safetensors checkpoint or an exported .onnx model (default {DEFAULT_CHECKPOINT})")
    _option(generate, "engine", choices=("auto", "torch", "onnx"), default="auto",
            help="torch, or onnx (onnxruntime, needs no torch); auto picks by the file's suffix")
    _option(generate, "prompt", default="", help="text to continue (default: start of a new line)")
    _option(generate, "max_new_tokens", type=int, default=200, help="characters to generate (default 200)")
    _option(generate, "temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    _option(generate, "top_k", type=int, default=None, help="sample only from the k likeliest characters")
    _option(generate, "top_p", type=float, default=None, help="sample from the smallest set holding this mass")
    _option(generate, "seed", type=int, default=None, help="same seed, same text")
    _option(generate, "num_samples", type=int, default=1, help="samples of the same prompt, decoded as one batch")
    _option(generate, "kv_cache", action=argparse.BooleanOptionalAction, default=True,
            help="keep earlier keys and values in a static cache (default); --no-kv-cache recomputes "
                 "the whole context every step, as the reference")
    _option(generate, "attention", choices=("auto", "torch", "triton"), default="auto",
            help="attention kernels for the torch engine: triton (fused, GPU), torch (SDPA), or auto: "
                 "triton on a GPU, torch otherwise")
    _option(generate, "device", default="auto", help="auto, cpu or cuda (default auto)")
    _option(generate, "threads", type=int, default=None,
            help="CPU threads (default for the onnx engine: 1 for one sample of a small model, every "
                 "core otherwise, as measured fastest; torch's own default for the torch engine)")

    evaluate = commands.add_parser("eval", help="loss and bits per character on a whole split",
                                   description="Evaluate a checkpoint on every character of one split.")
    _option(evaluate, "checkpoint", default=DEFAULT_CHECKPOINT, help=f"(default {DEFAULT_CHECKPOINT})")
    _option(evaluate, "data", default=None, help="text file or folder (default: the data it was trained on)")
    _option(evaluate, "split", choices=("valid", "test"), default="valid", help="(default valid)")
    _option(evaluate, "batch_size", type=int, default=64, help="windows per forward pass (default 64)")
    _option(evaluate, "device", default="auto", help="auto, cpu or cuda (default auto)")
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
    _option(export, "opset", type=int, default=None, help="ONNX opset of the standard operators (default 17)")
    _option(export, "quantize", choices=("int8",), default=None, help="int8: dynamic quantisation of the weights")
    _option(export, "verify", action=argparse.BooleanOptionalAction, default=True,
            help="check the graph and compare it with PyTorch (default); --no-verify skips it")
    _option(export, "force", action="store_true", help="overwrite an existing --out")
    return parser


def _train(args: argparse.Namespace) -> int:
    import os

    from minigpt.checkpoint import check_writable, load_checkpoint
    from minigpt.config import GPTConfig, TrainConfig
    from minigpt.data import corpus_from_source, load_corpus
    from minigpt.train import TrainingInterrupted, sample_after_training, train

    def fields_of(cls):
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "vocab_size"}

    model_fields = fields_of(GPTConfig)
    GPTConfig(vocab_size=1, **model_fields)  # an impossible shape fails before the data loads
    config = TrainConfig(**fields_of(TrainConfig))
    check_writable(args.out)  # before the data loads, not after
    resumed = load_checkpoint(args.resume) if args.resume else None  # vetted before any data is read
    if resumed is not None:
        ignored = [f"--{name} {value}" for name, value in model_fields.items()
                   if value != getattr(resumed.model.config, name)
                   and value != GPTConfig.__dataclass_fields__[name].default]
        if ignored:
            print(f"minigpt: --resume keeps the checkpoint's architecture; ignoring {', '.join(ignored)}",
                  file=sys.stderr)
    if resumed is not None and not args.data:  # the data it was trained on
        corpus = corpus_from_source(resumed.metadata.get("data", ""))
    else:
        corpus = load_corpus(args.data)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(corpus, config, args.out, progress=not args.quiet, resume=args.resume, force=args.force,
                       **model_fields)
    except TrainingInterrupted as stop:
        if is_main:
            print(f"minigpt: {stop}; saved {stop.path}. Resume with: minigpt train --resume {stop.path} "
                  f"--out {stop.path} --steps {config.steps} (and the same training flags)", file=sys.stderr)
        return 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
    if not is_main:
        return 0
    print(f"minigpt: trained to step {config.steps} in {result.wall_s:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s); saved {args.out}", file=sys.stderr)
    if args.sample_tokens > 0:
        print(f"minigpt: sample ({args.sample_tokens} characters, temperature 0.8):", file=sys.stderr)
        print(sample_after_training(result, args.sample_tokens))
    return 0


def _engine_for(args: argparse.Namespace):
    """(engine, tokenizer) for the flags; the onnx engine never imports torch."""
    onnx = args.engine == "onnx" or (args.engine == "auto" and args.checkpoint.endswith(".onnx"))
    if onnx:
        from minigpt.export.onnx_engine import OnnxEngine

        if not args.kv_cache:
            raise MiniGPTError("--no-kv-cache is a torch engine reference; the onnx engine always uses its cache")
        if args.attention != "auto":
            raise MiniGPTError("--attention picks the torch engine's kernels; drop it with --engine onnx")
        engine = OnnxEngine(args.checkpoint, threads=args.threads)
        return engine, engine.tokenizer
    from minigpt.checkpoint import load_checkpoint
    from minigpt.generation import torch_engine
    from minigpt.train import resolve_device

    from minigpt.export.onnx_engine import check_threads

    check_threads(args.threads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    checkpoint.model.set_attention_backend(args.attention)
    return torch_engine(checkpoint.model, args.kv_cache), checkpoint.tokenizer


def _generate(args: argparse.Namespace) -> None:
    from minigpt.decoding import join_samples, stream_characters

    engine, tokenizer = _engine_for(args)
    steps = stream_characters(engine, tokenizer, args.prompt, args.max_new_tokens, num_samples=args.num_samples,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
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
    print(f"minigpt: {count} new tokens in {elapsed:.2f} s ({count / max(elapsed, 1e-9):,.0f} tokens/s, "
          f"{type(engine).__name__})", file=sys.stderr)


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

    from minigpt.checkpoint import load_checkpoint
    from minigpt.data import corpus_from_source, load_corpus
    from minigpt.train import encode_split, evaluate_split, resolve_device

    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    corpus = load_corpus(args.data) if args.data else corpus_from_source(checkpoint.metadata.get("data", ""))
    ids = encode_split(checkpoint.tokenizer, corpus.split(args.split), args.split, 1)
    loss = evaluate_split(checkpoint.model, ids, args.batch_size)
    print(f"{args.split}: loss {loss:.4f} nats, {loss / math.log(2):.4f} bits/char "
          f"over {len(ids) - 1:,} characters of {corpus.source}")


COMMANDS = {"train": _train, "generate": _generate, "eval": _evaluate, "export": _export}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a malformed flag already reported in one line
        return exc.code
    try:
        return COMMANDS[args.command](args) or 0
    except MiniGPTError as exc:
        print(f"minigpt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minigpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
