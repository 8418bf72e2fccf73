"""ONNX export and the onnxruntime engine: same tokens as PyTorch, no torch needed to sample."""


import numpy as np
import pytest

from minigpt import load_checkpoint
from minigpt.cli import main
from minigpt.decoding import generate_rows
from minigpt.text import join_samples, stream_characters
from minigpt.rows import prefill
from minigpt.export.onnx_engine import OnnxEngine
from minigpt.generation import KVCacheEngine
from minigpt.sampling import Sampler

BLOCK = 16  # TINY_MODEL's block_size


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """fp32 and int8 graphs of the tiny checkpoint, written through the CLI with verification on."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {"fp32": folder / "tiny.onnx", "int8": folder / "tiny-int8.onnx"}
    for kind, path in paths.items():
        extra = ["--quantize", "int8"] if kind == "int8" else []
        argv = ["export", "--onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(path), *extra]
        assert main(argv) == 0
    return paths


def test_export_verifies_against_pytorch(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "onnx.checker: ok" in report
    assert "identical to the PyTorch KV-cache engine" in report
    delta = float(report.split("max |delta| ")[1].split()[0])
    assert delta <= 1e-4


@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK])
def test_greedy_tokens_match_pytorch_kv_cache(tiny_checkpoint, exported, prompt_len):
    model = load_checkpoint(tiny_checkpoint).model
    prompt = list(range(prompt_len))
    new = 3 * BLOCK  # past the block size too: both follow the same policy
    greedy = Sampler(temperature=0)
    torch_tokens = [int(t[0]) for t in generate_rows(KVCacheEngine(model), [prompt], new, greedy)]
    onnx_tokens = [int(t[0]) for t in generate_rows(OnnxEngine(exported["fp32"]), [prompt], new, greedy)]
    assert onnx_tokens == torch_tokens


def test_batched_samples_match_pytorch_for_the_same_seed(tiny_checkpoint, exported):
    checkpoint = load_checkpoint(tiny_checkpoint)
    options = dict(num_samples=3, temperature=1.0, top_p=0.9, seed=11)
    texts = {}
    for name, engine in (("torch", KVCacheEngine(checkpoint.model)), ("onnx", OnnxEngine(exported["fp32"]))):
        steps = stream_characters(engine, checkpoint.tokenizer, "the ", 40, **options)
        texts[name] = join_samples("the ", steps, 3)
    assert texts["onnx"] == texts["torch"]
    assert len(set(texts["onnx"])) > 1


def test_metadata_round_trip(tiny_checkpoint, exported):
    checkpoint = load_checkpoint(tiny_checkpoint)
    for path in exported.values():
        engine = OnnxEngine(path)
        assert engine.config == checkpoint.model.config
        assert engine.tokenizer == checkpoint.tokenizer


def test_graph_takes_any_batch_and_writes_the_cache_in_place(exported):
    engine = OnnxEngine(exported["fp32"])
    for batch in (1, 2, 5):
        engine.start(batch)
        cache = engine.cache
        logits = prefill(engine, np.zeros((batch, 1), dtype=np.int64))
        assert logits.shape == (batch, engine.config.vocab_size)
        for position in range(1, 4):
            logits = engine.extend(logits.argmax(-1)[:, None], np.full(batch, position))[:, 0]
        assert engine.cache is cache  # the same buffers, written by onnxruntime
        written = np.abs(cache).sum(axis=(0, 1, 3, 5))  # (rows, positions)
        assert (written[:, :4] > 0).all() and (written[:, 4:] == 0).all()


def test_int8_model_generates_valid_text(exported, capsys):
    assert main(["generate", "--model", str(exported["int8"]), "--prompt", "the ", "--max_new_tokens", "60",
                 "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    tokenizer = OnnxEngine(exported["int8"]).tokenizer
    assert out.startswith("the ") and len(out.rstrip("\n")) == 64
    tokenizer.encode(out.rstrip("\n"))  # every character is in the vocabulary
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size
    assert "OnnxEngine" in err


def test_cli_onnx_and_torch_print_the_same_greedy_text(tiny_checkpoint, exported, capsys):
    outputs = []
    for flags in (["--checkpoint", str(tiny_checkpoint)], ["--model", str(exported["fp32"]), "--engine", "onnx"]):
        assert main(["generate", *flags, "--prompt", "a small", "--max-new-tokens", "50", "--temperature", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_sampling_from_onnx_needs_no_torch(exported, cli_without):
    result = cli_without("torch", ["generate", "--model", str(exported["fp32"]), "--prompt", "the",
                                   "--max-new-tokens", "20", "--num-samples", "2", "--top-k", "5", "--seed", "3"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2


def test_export_bad_input(tiny_checkpoint, tmp_path, cli_error):
    cli_error(["export", "--onnx", "--checkpoint", str(tmp_path / "none.safetensors"),
               "--out", str(tmp_path / "a.onnx")], "checkpoint not found")
    cli_error(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "a.onnx")],
              "--onnx")
    cli_error(["export", "--onnx", "--checkpoint", str(tiny_checkpoint),
               "--out", str(tmp_path / "missing-folder" / "a.onnx")], "cannot write to")
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    cli_error(["export", "--onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(existing)],
              "already holds", "--force")
    assert existing.read_bytes() == b"keep me"
    cli_error(["export", "--onnx", "--checkpoint", str(tiny_checkpoint), "--out",
               str(tmp_path / "b.onnx"), "--opset", "16"], "opset")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_generate_bad_onnx_input(tmp_path, exported, cli_error):
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"this is not a protobuf graph")
    cli_error(["generate", "--model", str(not_onnx)], "not a loadable ONNX model")
    cli_error(["generate", "--model", str(tmp_path / "absent.onnx")], "ONNX model not found")
    cli_error(["generate", "--model", str(exported["fp32"]), "--no-kv-cache"], "--no-kv-cache")
    cli_error(["generate", "--model", str(exported["fp32"]), "--prompt", "XYZ"], "never saw")
    cli_error(["generate", "--model", str(older_export(tmp_path, exported["fp32"]))],
              "older minigpt", "export it again")


def older_export(folder, current):
    """A graph with minigpt metadata whose inputs are the old past/present style (no in-place cache)."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    past = helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT, ["batch", 2, "past", 16])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "old", [ids, past], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for prop in onnx.load(current).metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    path = folder / "old.onnx"
    onnx.save(model, path)
    return path


def without_query_lengths(folder, current):
    """The graph as minigpt exported it before GroupQueryAttention took each row's count of new tokens."""
    import onnx

    from minigpt.export.onnx_graph import QUERY_LENGTHS

    model = onnx.load(current)
    kept = [graph_input for graph_input in model.graph.input if graph_input.name != QUERY_LENGTHS]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for node in model.graph.node:
        if QUERY_LENGTHS in node.input:
            del node.input[list(node.input).index(QUERY_LENGTHS):]
    path = folder / "before-query-lengths.onnx"
    onnx.save(model, path)
    return path


def test_a_graph_from_before_query_lengths_extends_a_batch_one_row_at_a_time(tmp_path, exported):
    """Several tokens for each of several rows with a past: one call on this minigpt's graph, a call per row on
    an older one (whose GroupQueryAttention refuses them together), the same logits either way; speculative
    decoding then verifies a batch only on the graph that does it in one call."""
    from minigpt.decoding import Continuation
    from minigpt.rows import Rows
    from minigpt.speculative import SpeculativeStep

    engines = {"current": OnnxEngine(exported["fp32"]),
               "older": OnnxEngine(without_query_lengths(tmp_path, exported["fp32"]))}
    assert [engine.verifies_rows_together for engine in engines.values()] == [True, False]
    step = SpeculativeStep(engines["current"].ngram_draft())

    def greedy_rows(engine):
        rows = Rows(engine, 3)
        rows.add([[1], [2], [3]], [Continuation([1], Sampler(temperature=0), None, 4) for _ in range(3)])
        return rows

    assert [step.pays(greedy_rows(engine)) for engine in engines.values()] == [True, False]
    rng = np.random.default_rng(4)
    prompts, new = [rng.integers(0, 20, size=(1, length)) for length in (2, 9, 5)], rng.integers(0, 20, size=(3, 4))
    logits = {}
    for name, engine in engines.items():
        engine.start(3)
        for row, prompt in enumerate(prompts):  # rows at their own lengths
            prefill(engine, prompt, first_row=row)
        logits[name] = engine.extend(new, np.array([prompt.shape[1] for prompt in prompts])).copy()
    np.testing.assert_allclose(logits["current"], logits["older"], atol=1e-5, rtol=1e-5)


def without_logit_positions(folder, current):
    """The graph as minigpt exported it before it kept only the positions whose logits are asked for."""
    import onnx

    from minigpt.export.onnx_graph import LOGIT_POSITIONS

    model = onnx.load(current)
    kept = [graph_input for graph_input in model.graph.input if graph_input.name != LOGIT_POSITIONS]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    gathers = {node.output[0]: node.input[0] for node in model.graph.node if LOGIT_POSITIONS in node.input}
    nodes = [node for node in model.graph.node if node.output[0] not in gathers]
    for node in nodes:
        node.input[:] = [gathers.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = folder / "before-logit-positions.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "onnx", "onnx-before"])
def test_a_prefill_returns_its_last_positions_logits_alone(make_engine, exported, tmp_path, engine_name):
    """last_only (what a prefill asks for): each row's last position's logits, as every position's call gives
    them, on every engine, and on a graph exported before it could skip the others."""
    def make():
        if engine_name == "onnx-before":
            engine = OnnxEngine(without_logit_positions(tmp_path, exported["fp32"]))
            assert "logit_positions" not in {graph_input.name for graph_input in engine.session.get_inputs()}
            return engine
        return make_engine(engine_name)

    ids, at_zero = np.random.default_rng(5).integers(0, 20, size=(2, 9)), np.zeros(2, dtype=np.int64)
    every, last = make(), make()
    every.start(2)
    last.start(2)
    everything = every.extend(ids, at_zero).copy()
    alone = last.extend(ids, at_zero, last_only=True).copy()
    assert alone.shape == (2, 1, everything.shape[-1])
    np.testing.assert_allclose(alone, everything[:, -1:], atol=1e-5, rtol=1e-5)
    # and both caches hold every position: the next step's logits agree
    step = ids[:, -1:]
    np.testing.assert_allclose(last.extend(step, at_zero + 9), every.extend(step, at_zero + 9), atol=1e-5, rtol=1e-5)


def test_kept_bindings_are_bounded_and_evicting_them_changes_no_logits(exported, monkeypatch):
    """A server writes prompts of every length at every row: the engine keeps at most KEPT_STEPS shapes' bindings
    (the least recently used dropped), and a step made again after it was dropped computes the same numbers."""
    from minigpt.export import onnx_engine

    def run(engine):
        engine.start(4)
        outputs = []
        for turn in range(3):
            for first_row in range(4):
                for new in (1, 2, 3):
                    ids = np.full((1, new), (first_row + new + turn) % engine.config.vocab_size, dtype=np.int64)
                    start = np.array([turn * 3 + new % 2])
                    outputs.append(engine.extend(ids, start, first_row).copy())  # a kept step reuses its buffer
        return outputs, len(engine._steps)

    everything, kept_all = run(OnnxEngine(exported["fp32"]))
    monkeypatch.setattr(onnx_engine, "KEPT_STEPS", 3)
    bounded, kept = run(OnnxEngine(exported["fp32"]))
    assert kept_all == 12 and kept == 3
    for a, b in zip(everything, bounded, strict=True):
        np.testing.assert_array_equal(a, b)
