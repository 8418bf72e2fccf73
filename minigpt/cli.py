"""`minigpt` command line: train, generate, eval, export.

Torch is imported inside the commands, not here, so `--help` is instant.
Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from minigpt.errors import MiniGPTError
from minigpt.flags import DEFAULT_CHECKPOINT, DEFAULT_METRICS, EXIT_USAGE, build_parser, given, parse

WARM_UP_TOKENS = 8  # generate's warm-up: enough for a prefill, the yardstick's plain steps and a verify step


def _train(args: argparse.Namespace) -> int:
    from minigpt.config import GPTConfig, TrainConfig
    from minigpt.train import TrainingInterrupted, plan_training, run_training, sample_after_training

    if args.warmup is not None and args.warmup > (args.steps or TrainConfig.steps):
        raise MiniGPTError(f"--warmup {args.warmup} is longer than the run ({args.steps or TrainConfig.steps} "
                           "steps): the learning rate would never reach its peak; lower --warmup or raise --steps")

    plan = plan_training(args.out or args.resume or DEFAULT_CHECKPOINT, data=args.data,
                         config=given(args, TrainConfig), resume=args.resume, init_from=args.init_from,
                         force=args.force, compile=args.compile, cache_dir=args.cache_dir,
                         text_column=args.text_column, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         **given(args, GPTConfig, skip=("vocab_size",)))
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
        unit = "characters" if plan.tokenizer.kind == "char" else "tokens"
        print(f"minigpt: sample ({args.sample_tokens} {unit}, temperature 0.8):", file=sys.stderr)
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


def _engine_for(args: argparse.Namespace, rows: int):
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
    from minigpt.kernels.backends import use_attention_backend

    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    model_bytes = sum(p.numel() * p.element_size() for p in checkpoint.model.parameters())
    _use_threads(args.threads or threads_for(rows, model_bytes))  # as the onnx engine picks them
    use_attention_backend(checkpoint.model, args.attention)
    return torch_engine(checkpoint.model, args.kv_cache), checkpoint.tokenizer, checkpoint.ngram_draft()


def _step_for(args: argparse.Namespace, tokenizer, ngram, rows: int):
    """The speculative step --draft and --draft-tokens ask for (None for --draft none); a draft model named by
    its file is loaded as the model is, and must use the model's characters."""
    from minigpt.speculative import DRAFT_CHOICES, make_step

    draft_engine = None
    if args.draft not in DRAFT_CHOICES:
        draft_args = argparse.Namespace(**{**vars(args), "checkpoint": args.draft, "engine": "auto"})
        draft_engine, draft_tokenizer, _ = _engine_for(draft_args, rows)
        if draft_tokenizer != tokenizer:
            raise MiniGPTError(f"the draft model {args.draft} has other tokens than the model "
                               f"({draft_tokenizer.vocab_size} against {tokenizer.vocab_size}); a draft model must "
                               "use the model's tokenizer, or use --draft ngram or context")
    return make_step(args.draft, ngram, args.draft_tokens, draft_engine)


def _generate(args: argparse.Namespace) -> None:
    from minigpt.fast_sampling import FastSampler
    from minigpt.text import join_samples, stream_characters

    engine, tokenizer, ngram = _engine_for(args, args.num_samples)
    step = _step_for(args, tokenizer, ngram, args.num_samples)
    sampling = {**_sampling(args, tokenizer), "cache": {}}  # a pattern is compiled once
    # A warm-up, as llama.cpp runs one: a few tokens through the same path (the prompt's prefill, the sampler, a
    # step that guesses as this one will), thrown away, so that the first runs of each graph shape and of the
    # loop's code are not what the rate below measures (the whole command measured no slower for it). Its step
    # shares this one's schedules (the step costs it measures), not its counts.
    def characters(count: int, step):
        return stream_characters(engine, tokenizer, args.prompt, count, num_samples=args.num_samples, step=step,
                                 sampler_type=FastSampler, by_step=True, **sampling)

    for _ in characters(min(WARM_UP_TOKENS, args.max_new_tokens),
                        None if step is None else step.warm_up_step()):
        pass
    steps = characters(args.max_new_tokens, step)
    start, count = time.perf_counter(), 0
    if args.num_samples == 1:  # one sample streams as it is produced, a write a step (each flush is a system call)
        sys.stdout.write(args.prompt)
        for found in steps:
            count += len(found)
            sys.stdout.write("".join(piece for piece, in found))
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:  # a batch finishes together: print each sample whole
        columns = [position for found in steps for position in found]
        count = len(columns) * args.num_samples
        for number, text in enumerate(join_samples(args.prompt, columns, args.num_samples), start=1):
            sys.stdout.write(f"--- sample {number} of {args.num_samples} ---\n{text}\n")
    elapsed = time.perf_counter() - start
    # Positions found, a token a sample each (a last one may only finish a character a token left incomplete).
    count = min(count, args.num_samples * args.max_new_tokens)
    speculated = f"; speculative: {step.report()}" if step is not None else ""
    print(f"minigpt: {count} new tokens in {elapsed:.2f} s ({count / max(elapsed, 1e-9):,.0f} tokens/s, "
          f"{type(engine).__name__}{speculated})", file=sys.stderr)


def _sampling(args: argparse.Namespace, tokenizer) -> dict:
    """The sampler's settings from generate's flags; --logit-bias names tokens by their text."""
    bias = {}
    for text, value in args.logit_bias or ():
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise MiniGPTError(f"--logit-bias {text}={value:g}: {text!r} is {len(ids)} tokens of this model, not one; "
                               "give the text of a single token")
        bias[ids[0]] = value
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, logit_bias=bias, regex=args.regex, choices=args.choice,
                json_schema=args.json_schema)


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
    from minigpt.serve.limits import Limits
    from minigpt.serve.protocol import lm_eval_model_args

    limits = Limits(**given(args, Limits))
    engine, tokenizer, ngram = _engine_for(args, limits.max_batch)
    step = _step_for(args, tokenizer, ngram, limits.max_batch)
    model_id = Path(args.checkpoint).stem
    print(f"minigpt: serving {model_id!r} ({type(engine).__name__}, {limits.max_batch} rows) at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    print(f"minigpt: lm-eval scores it with --model local-completions --model_args "
          f"{lm_eval_model_args(model_id, f'http://{args.host}:{args.port}/v1', tokenizer, engine.block_size)}",
          file=sys.stderr, flush=True)
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
        figure = plot.bits_against_seconds(runs) if args.against == "seconds" else plot.training_curves(runs)
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

    from minigpt.checkpoint import load_checkpoint
    from minigpt.data import load_corpus, load_recorded_corpus
    from minigpt.devices import free_cores, resolve_device
    from minigpt.generation import split_bits

    _use_threads(args.threads or free_cores())
    checkpoint = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    corpus = (load_corpus(args.data, args.cache_dir) if args.data
              else load_recorded_corpus(checkpoint.metadata, args.cache_dir))
    bits = split_bits(checkpoint.model, checkpoint.tokenizer, corpus, args.split, args.batch_size)
    print(f"{args.split}: loss {bits.per('tokens') * math.log(2):.4f} nats a token, {bits.per('characters'):.4f} "
          f"bits/char, {bits.per('bytes'):.4f} bits/byte over {bits.characters:,} characters ({bits.bytes:,} bytes, "
          f"{bits.tokens:,} tokens) of {corpus.source}")


COMMANDS = {"train": _train, "generate": _generate, "serve": _serve, "eval": _evaluate, "export": _export,
            "plot": _plot, "attention": _attention}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(build_parser(), argv)
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
