"""The command line's flags: one parser, each flag defined once (shared flags through `_shared`).

Kept apart from `minigpt.cli`, which runs the commands: nothing here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses

from minigpt.settings import COUNT, DRAFT_TOKENS, MOST_DRAFT_TOKENS, POSITIVE, SEED, VOCAB_SIZE, Bounded

EXIT_USAGE = 2
DEFAULT_CHECKPOINT = "minigpt.safetensors"
DEFAULT_METRICS = "minigpt.metrics.jsonl"
CACHE_DIR_HELP = "where encoded data is kept (default $XDG_CACHE_HOME/minigpt or ~/.cache/minigpt)"
# Flags several commands share, each defined here once: (spellings, what argparse needs).
SHARED = {
    "checkpoint": dict(default=DEFAULT_CHECKPOINT, metavar="PATH"),
    "device": dict(default="auto"),
    "threads": dict(type=POSITIVE, default=None, metavar="N"),
    "cache_dir": dict(default=None, metavar="DIR", help=CACHE_DIR_HELP),
    "force": dict(action="store_true"),
}


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})  # a typo is an error with a suggestion

    def error(self, message: str):  # argparse prints usage too; keep it to one line
        import difflib
        import re

        wrong = re.match(r"argument [^:]+: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if wrong:  # a misspelt command or choice: name the closest one
            choices = re.findall(r"'([^']*)'", wrong.group(2))
            close = difflib.get_close_matches(wrong.group(1), choices, n=1)
            message += f"; did you mean {close[0]}?" if close else ""
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


def _shared(parser, name: str, *aliases: str, **overrides) -> None:
    """Add one of the SHARED flags, with this command's help text."""
    _option(parser, name, *aliases, **{**SHARED[name], **overrides})


def _dataclass_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One option per dataclass field, typed, explained and defaulted by the field itself.

    The parsed value is None when the flag is not given, so `--resume` can tell what was asked for.
    """
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        bounds = f.metadata.get("bounds")
        kind = bounds.kind if bounds is not None else type(f.default)
        _option(parser, f.name, type=bounds or kind, default=None, metavar=kind.__name__.upper(),
                help=f"{f.metadata['help']} (default {f.metadata.get('shown') or f.default})")


def given(args: argparse.Namespace, cls, skip=()) -> dict:
    """The fields of `cls` set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """The model and how to run it: the same flags wherever a model is run (generate, serve)."""
    _shared(parser, "checkpoint", "model",
            help=f"a checkpoint, an exported .onnx model, or an export --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(parser, "engine", choices=("auto", "torch", "onnx"), default="auto",
            help="torch, or onnx (onnxruntime); auto picks onnx for a .onnx file (default auto)")
    _option(parser, "attention", choices=("auto", "torch", "triton"), default="auto",
            help="attention kernels of the torch engine: triton (our fused kernels, GPU), torch (PyTorch SDPA), "
                 "auto (Triton on a GPU, PyTorch otherwise) (default auto)")
    _shared(parser, "device", help="auto, cpu or cuda; the onnx engine runs on the CPU (default auto)")
    _shared(parser, "threads",
            help="CPU threads; both engines pick 1 for one sample of a small model (under 4 MB of weights) "
                 "and otherwise the cores no other work is using when the command starts, as measured fastest "
                 "(see bench/README.md) (default picked)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minigpt", description="Train, sample and evaluate a character-level GPT.")
    parser.add_argument("--version", action="version", version=f"minigpt {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_train, _add_generate, _add_serve, _add_plot, _add_attention, _add_eval, _add_export):
        add(commands)
    return parser


def _add_train(commands) -> None:
    from minigpt.config import GPTConfig, TrainConfig  # dataclasses only: no torch

    train = commands.add_parser("train", help="train a model and save a checkpoint",
                                description="Train a MiniGPT, save it, then print a sample.")
    _option(train, "data", default=None, metavar="PATH",
            help="a text file (its last 10%% is validation), a folder with wiki.{train,valid,test}.raw, "
                 "wiki.{train,valid,test}.tokens or {train,valid,test}.txt, a folder of other .txt files (read in "
                 "name order as one text, its last 10%% validation), or hf:NAME[:CONFIG], a HuggingFace text dataset "
                 "(default WikiText-2 from the hub, or an offline fallback corpus)")
    _option(train, "out", default=None, metavar="PATH",
            help="the checkpoint to write; its log NAME.metrics.jsonl goes beside it "
                 f"(default {DEFAULT_CHECKPOINT}, or with --resume the checkpoint resumed)")
    model_group = train.add_argument_group("model")
    _dataclass_options(model_group, GPTConfig, skip=("vocab_size",))
    _option(model_group, "tokenizer", default=None, metavar="KIND",
            help="char (a token a character), bpe (a byte-level BPE learnt from the training text with HuggingFace "
                 "tokenizers), or a byte-level BPE tokenizer.json file; kept in the checkpoint (default char)")
    _option(model_group, "vocab_size", type=VOCAB_SIZE, default=None, metavar="N",
            help="with --tokenizer bpe, its tokens: 256 (the bytes alone) to 65,536 (default 1024)")
    train_group = train.add_argument_group("training")
    _dataclass_options(train_group, TrainConfig)
    _option(train, "resume", default=None, metavar="CKPT",
            help="continue a checkpoint written by minigpt train: model, optimizer, step and training settings "
                 "come back; training flags given with it override them")
    _option(train, "text_column", default="text", metavar="NAME",
            help="with --data hf:NAME[:CONFIG], the dataset's column of text (default text)")
    _shared(train, "cache_dir")
    _option(train, "init_from", default=None, metavar="CKPT",
            help="start a new run from a checkpoint's tensors wherever name and shape match (token embedding "
                 "rows by character): a deeper model, another corpus")
    _option(train, "compile", action="store_true",
            help="run the training step through torch.compile (on a CPU it needs a C++ compiler; see bench/README.md "
                 "for what it buys)")
    _shared(train, "force",
            help="replace an existing --out (a trained model is never replaced without it)")
    _option(train, "sample_tokens", type=COUNT, default=300, metavar="N",
            help="tokens to sample at the end, characters for a character model (default 300)")
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
    _sampling_controls(generate)
    _option(generate, "num_samples", type=POSITIVE, default=1, metavar="N",
            help="samples of the same prompt, decoded together as one batch (default 1)")
    _option(generate, "kv_cache", action=argparse.BooleanOptionalAction, default=True,
            help="keep earlier keys and values in a static cache; --no-kv-cache recomputes the whole context "
                 "every step (the reference) (default on)")


def _sampling_controls(parser: argparse.ArgumentParser) -> None:
    """min-p, the penalties, logit bias and a pattern (docs/sampling.md): each typed and explained by the
    sampler's own field, as the server checks a request's."""
    from minigpt.controls import ControlledSampler

    fields = {f.name: f for f in dataclasses.fields(ControlledSampler)}
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        field = fields[name]
        _option(parser, name, type=field.metadata["bounds"], default=field.default, metavar="X",
                help=f"{field.metadata['help']} (default {'off' if field.default is None else field.default})")
    _option(parser, "logit_bias", type=_bias, action="append", metavar="TEXT=BIAS",
            help="add BIAS (-100 to 100) to the logit of the token TEXT spells; repeatable (default none)")
    _option(parser, "regex", metavar="PATTERN", help="the new text must match this regular expression; it ends "
                                                     "when the pattern allows nothing more (default none)")
    _option(parser, "choice", action="append", metavar="TEXT",
            help="the new text is one of these; repeatable (default none)")
    _option(parser, "json_schema", metavar="SCHEMA", help="the new text is JSON this schema (its JSON text) accepts "
                                                          "(default none)")


def _bias(value: str) -> tuple[str, float]:
    from minigpt.controls import BIAS

    text, _, bias = value.rpartition("=")
    if not text:
        raise argparse.ArgumentTypeError(f"must be TEXT=BIAS, got {value!r}")
    return text, BIAS(bias)  # a bias out of range: BIAS's own message, as any bounded flag's


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
    from minigpt.serve.limits import Limits  # a dataclass alone: no server imported

    _dataclass_options(serve.add_argument_group("limits"), Limits)
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
    _option(plot, "against", choices=("step", "seconds"), default="step",
            help="step: loss and learning rate against the step; seconds: validation bits per character against "
                 "training seconds, which compares runs with other tokenizers (default step)")
    _option(plot, "bench", default=None, metavar="JSON",
            help="draw this pytest-benchmark JSON (pytest bench/ --benchmark-json=FILE) instead")
    _option(plot, "out", default=None, metavar="PATH",
            help="the picture, .png or .svg (default curves.png, or bench.png with --bench)")
    _shared(plot, "force", help="replace an existing picture at --out")


def _add_attention(commands) -> None:
    attention = commands.add_parser("attention", help="draw what the model's attention heads look at",
                                    description="Draw the model's attention weights for a prompt: every layer and "
                                                "head, one layer (--layer), one head (--head), or one map (both).")
    _shared(attention, "checkpoint", help=f"a checkpoint or an export --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(attention, "prompt", required=True, help="the text whose attention to draw")
    _option(attention, "layer", type=COUNT, default=None, metavar="L", help="only this layer (from 0)")
    _option(attention, "head", type=COUNT, default=None, metavar="H", help="only this head (from 0)")
    _option(attention, "out", default="attention.png", metavar="PATH",
            help="the picture, .png or .svg (default attention.png)")
    _shared(attention, "force", help="replace an existing picture at --out")


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss and bits per character on a whole split",
                                   description="Evaluate a checkpoint on every character of one split.")
    _shared(evaluate, "checkpoint",
            help=f"the checkpoint to measure, or an export --hf folder (default {DEFAULT_CHECKPOINT})")
    _option(evaluate, "data", default=None, help="text file or folder (default: the data it was trained on)")
    _option(evaluate, "split", choices=("valid", "test"), default="valid",
            help="which split to measure, every character of it (default valid)")
    _shared(evaluate, "cache_dir")
    _option(evaluate, "batch_size", type=POSITIVE, default=64, help="windows per forward pass (default 64)")
    _shared(evaluate, "device", help="auto, cpu or cuda (default auto)")
    _shared(evaluate, "threads", help="CPU threads (default every core)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="export a checkpoint to ONNX or a HuggingFace directory",
                                 description="Export a checkpoint to one ONNX graph for onnxruntime (--onnx) or "
                                             "to a transformers GPT-2 directory (--hf), verified first.")
    formats = export.add_mutually_exclusive_group()
    _option(formats, "onnx", action="store_true", help="one ONNX graph, its KV-cache updated in place")
    _option(formats, "hf", action="store_true",
            help="a transformers GPT-2 directory with a character-level tokenizer (pip install 'minigpt[hf]')")
    _shared(export, "checkpoint",
            help=f"a checkpoint or an exported --hf directory (default {DEFAULT_CHECKPOINT})")
    _option(export, "out", default=None, help="what to write (default minigpt.onnx, or the folder minigpt-hf)")
    _option(export, "opset", type=Bounded(int, 17), default=None,
            help="ONNX opset of the standard operators (default 17)")
    _option(export, "quantize", choices=("int8",), default=None, help="int8: dynamic quantisation of the weights")
    _option(export, "verify", action=argparse.BooleanOptionalAction, default=True,
            help="check the graph and compare it with PyTorch (default); --no-verify skips it")
    _shared(export, "force", help="overwrite an existing --out")



def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
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
