"""`minigpt export --hf`: a transformers GPT-2 directory that agrees with minigpt, and loads back."""

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny import LM_EVAL_TEXT, eval_bits, run_lm_eval
from minigpt import load_checkpoint
from minigpt.cli import main
from minigpt.generation import generate

transformers = pytest.importorskip("transformers", reason="--hf needs transformers: pip install 'minigpt[hf]'")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    assert main(["export", "--hf", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_export_writes_a_verified_directory(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m-hf"
    assert main(["export", "--hf", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "transformers GPT-2 directory" in report
    assert float(report.split("max |delta| ")[1].split()[0]) <= 1e-4
    assert "identical to minigpt's" in report and "the training text" in report
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["n_positions"], config["activation_function"]) == ("gpt2", 16, "gelu_new")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tokenizer_gives_minigpt_ids_and_the_same_text_back(tiny_checkpoint, hf_tokenizer, data):
    tokenizer = load_checkpoint(tiny_checkpoint).tokenizer
    text = data.draw(st.text(alphabet=tokenizer.chars, max_size=80))
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_spaces_newlines_and_non_ascii_round_trip(tmp_path, tiny_model):
    """A vocabulary with tabs, runs of spaces, carriage returns and characters outside ASCII."""
    import torch

    from minigpt import CharTokenizer, GPTConfig, MiniGPT, save_checkpoint

    tokenizer = CharTokenizer("ab \n\t\r.éß世😀\u00a0")
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, **tiny_model))
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    assert main(["export", "--hf", "--checkpoint", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "d")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "d")
    for text in ["a  b\n\n\tc"[:-1], "   ", "\r\n", "é世😀 \u00a0.", "ß"]:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.encode(text) and hf_tokenizer.decode(ids) == text


def test_directory_loads_back_into_every_command(tiny_checkpoint, hf_dir, tmp_path, capsys):
    flags = ["--prompt", "the ", "--max-new-tokens", "30", "--temperature", "0"]
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), *flags]) == 0
    original = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(hf_dir), *flags]) == 0
    assert capsys.readouterr().out == original
    assert main(["eval", "--checkpoint", str(hf_dir)]) == 0  # the data it was trained on travels in config.json
    assert "bits/char" in capsys.readouterr().out
    onnx_out = tmp_path / "from-hf.onnx"
    assert main(["export", "--onnx", "--checkpoint", str(hf_dir), "--out", str(onnx_out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(onnx_out), *flags]) == 0
    assert capsys.readouterr().out == original


def test_transformers_pipeline_writes_minigpt_text(tiny_checkpoint, hf_dir):
    checkpoint = load_checkpoint(tiny_checkpoint)
    expected = generate(checkpoint.model, checkpoint.tokenizer, "the ", 10, temperature=0)
    pipe = transformers.pipeline("text-generation", model=str(hf_dir))
    assert pipe("the ", max_new_tokens=10, do_sample=False)[0]["generated_text"] == expected


def test_generate_takes_the_tokenizers_output_as_it_is(tiny_loaded, hf_dir, hf_tokenizer):
    """`model.generate(**tokenizer(text))`, as optimum's ORTModelForCausalLM and most HF code call it: GPT-2
    takes no token_type_ids, and no character is special, so decoding keeps every newline."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    inputs = hf_tokenizer("the \n", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = generate(tiny_loaded.model, tiny_loaded.tokenizer, "the \n", 10, temperature=0)
    assert hf_tokenizer.decode(out[0], skip_special_tokens=True) == expected
    assert hf_tokenizer.all_special_ids == [] and model.config.bos_token_id is model.config.eos_token_id is None
    assert len(hf_tokenizer) == model.config.vocab_size  # as CTranslate2's conversion requires


def test_lm_eval_hf_model_scores_the_export_as_minigpt_eval_does(tiny_loaded, hf_dir, tmp_path):
    """lm-eval's `hf` model on the directory, with the one argument a character vocabulary needs (the newline
    to begin a text after): the bits per character of `minigpt eval`. Its generation tasks want an end token,
    which the export does not declare (see tokenizer_config): they go through `minigpt serve`."""
    args = f"pretrained={hf_dir},prefix_token_id={tiny_loaded.tokenizer.id_of(chr(10))}"
    bits, _ = run_lm_eval(tmp_path, "hf", args, LM_EVAL_TEXT, prompts=[])
    assert bits == pytest.approx(eval_bits(tiny_loaded, LM_EVAL_TEXT), abs=1e-5)


def test_bad_input(tiny_checkpoint, hf_dir, tmp_path, cli_error):
    cli_error(["export", "--hf", "--checkpoint", str(tmp_path / "none.safetensors"),
               "--out", str(tmp_path / "x")], "checkpoint not found")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep me")
    for force in ([], ["--force"]):  # a folder that is not an export is never replaced, --force or not
        cli_error(["export", "--hf", "--checkpoint", str(tiny_checkpoint), "--out", str(existing), *force],
                  "is a folder", "replaces only a transformers directory")
    assert (existing / "keep.txt").read_text() == "keep me"
    cli_error(["export", "--hf", "--checkpoint", str(hf_dir), "--out", str(hf_dir), "--force"],
              "is also this command's --checkpoint")
    cli_error(["export", "--hf", "--quantize", "int8", "--checkpoint", str(tiny_checkpoint)],
              "--onnx")
    cli_error(["generate", "--checkpoint", str(existing)], "not a minigpt/GPT-2 export")
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    cli_error(["generate", "--checkpoint", str(other)], "not a minigpt/GPT-2 export", "llama")
    (other / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"] = {"type": "BPE", "vocab": {"th": 0, "e": 1}, "merges": []}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    cli_error(["eval", "--checkpoint", str(other)], "character-level")


def test_force_replaces_an_export(tiny_checkpoint, hf_dir, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(hf_dir, out)
    (out / "stale.txt").write_text("old")
    assert main(["export", "--hf", "--force", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_without_transformers_the_flag_names_the_extra(tiny_checkpoint, tmp_path, cli_without):
    result = cli_without("transformers", ["export", "--hf", "--checkpoint", str(tiny_checkpoint),
                                          "--out", str(tmp_path / "d")])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "minigpt[hf]" in result.stderr
    assert not (tmp_path / "d").exists()


def test_the_huggingface_pages_pipeline_example_runs_as_written(tmp_path, tiny_flags, monkeypatch):
    """The HuggingFace page's Python block that uses `pipeline(...)`, run as it is written beside a `minigpt-hf` of a
    model with the default block size (the example's 104 positions must fit) and a vocabulary holding "The "."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "docs" / "huggingface.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "pipeline(" in block]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(("The fox and the dog.\n" * 200))
    for argv in (["train", "--data", "text.txt", *tiny_flags(block_size=128, steps=2), "--out", "m.safetensors"],
                 ["export", "--hf", "--checkpoint", "m.safetensors", "--out", "minigpt-hf"]):
        assert main(argv) == 0
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The ") and len(result.stdout.rstrip("\n")) == 104
    assert "max_length" not in result.stderr  # the export sets none for max_new_tokens to meet


def test_transformers_loads_the_export_from_the_repositorys_root(hf_dir):
    """transformers imports HuggingFace's package `kernels` when it loads a model; a Python started in the
    repository's root, where the project's `kernels/` folder sits, gets that package and not the folder."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    script = ("import kernels, minigpt.kernels\n"
              "assert kernels.__file__ != minigpt.kernels.__file__, kernels.__file__\n"
              "from transformers import pipeline\n"
              f"out = pipeline('text-generation', model={str(hf_dir)!r})('the ', max_new_tokens=5, do_sample=False)\n"
              "print(out[0]['generated_text'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the ") and len(result.stdout.rstrip("\n")) == 9
