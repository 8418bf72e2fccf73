"""Export a checkpoint as a HuggingFace transformers directory: GPT-2 architecture, character-level tokenizer.

The directory holds `config.json`, `model.safetensors` (GPT-2 tensor names,
see `minigpt.export.gpt2`), `generation_config.json`, and a `tokenizer.json`
for the `tokenizers` library that splits text into single characters and maps
each to minigpt's id, so `AutoModelForCausalLM` / `AutoTokenizer` /
`pipeline("text-generation")` load it as they load any GPT-2, and
`minigpt ... --checkpoint DIR` loads it back.

Nothing is written until transformers, reading the directory back, agrees
with minigpt: logits within 1e-4, 100 greedy tokens (or up to the block)
from `model.generate` equal to minigpt's, and the tokenizer's round trip.
The directory is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt.checkpoint import load_checkpoint
from minigpt.data import DataSource, load_corpus
from minigpt.decoding import generate_rows
from minigpt.errors import MiniGPTError
from minigpt.export.gpt2 import gpt2_config, gpt2_state_dict
from minigpt.export.onnx_export import LOGIT_TOLERANCE, VERIFY_NEW_TOKENS, ExportReport, quiet
from minigpt.generation import KVCacheEngine
from minigpt.model import MiniGPT
from minigpt.paths import check_output_folder, check_replaceable, current_umask
from minigpt.sampling import Sampler
from minigpt.tokenizer import CharTokenizer

ROUND_TRIP_CHARACTERS = 20_000
UNICODE_SAMPLE = "a subword model's text: naïve café, 東京, 😀 👩‍💻, tabs\tand\n\nnewlines"  # any text round-trips


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise MiniGPTError("--hf needs the transformers package: pip install 'minigpt[hf]'") from None
    transformers.logging.set_verbosity_error()  # the report says what matters; no progress bars or notices
    transformers.logging.disable_progress_bar()
    return transformers


def tokenizer_json(tokenizer: CharTokenizer) -> str:
    """A `tokenizers` tokenizer that gives every character its minigpt id and joins ids back without spaces (a
    subword model's is its own tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    if tokenizer.kind != "char":
        return tokenizer.to_json()
    # WordLevel insists on an unknown token; the first character stands in. Text with characters outside the
    # vocabulary cannot be encoded faithfully by any character model: minigpt refuses it instead.
    hf = Tokenizer(WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=tokenizer.chars[0]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    hf.decoder = decoders.Fuse()  # ids back to text with nothing between characters
    return hf.to_str(pretty=True)


def tokenizer_config(block_size: int) -> dict:
    """No special tokens. A character vocabulary has no character to spare for "begin" or "end": declaring the
    newline one would make transformers drop every newline from decoded text, and a token of the tokenizer's
    own past the model's vocabulary breaks CTranslate2's conversion (its vocabulary must be the model's). A
    text begins after a newline, as `minigpt eval` reads one (lm-eval: `prefix_token_id=` the newline's id).
    GPT-2 takes no token_type_ids: without model_input_names the tokenizer would hand generate() some."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": block_size, "model_input_names": ["input_ids", "attention_mask"]}


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike = "minigpt-hf", *, force: bool = False,
              verify: bool = True) -> ExportReport:
    """Write `checkpoint` as a transformers directory at `out`, verified against minigpt unless verify=False."""
    transformers = require_transformers()
    out = Path(out)
    check_output_folder(out)
    check_replaceable(out, writes="hf", force=force, inputs=[("--checkpoint", checkpoint)])
    loaded = load_checkpoint(checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet():
            config = transformers.GPT2Config(**gpt2_config(model.config), minigpt_data=loaded.metadata.get("data", ""),
                                             minigpt_step=loaded.step)
            hf_model = transformers.GPT2LMHeadModel(config)
            weights = {name: tensor.detach().cpu().contiguous()
                       for name, tensor in gpt2_state_dict(model.state_dict()).items()}
            hf_model.load_state_dict(weights, strict=False)  # strict=False: the tied head and attention masks
            # No max_length: transformers warns when a caller's max_new_tokens meets one (the pipeline's usual
            # call); the block still bounds prompt and new tokens together (`model_max_length`).
            hf_model.generation_config = transformers.GenerationConfig(
                bos_token_id=None, eos_token_id=None, pad_token_id=None, do_sample=True, temperature=0.8)
            hf_model.save_pretrained(staging)
        (staging / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model.config.block_size)),
                                                           encoding="utf-8")
        lines = verify_directory(staging, model, tokenizer, training_sample(loaded.metadata)) if verify else []
        size = sum(f.stat().st_size for f in staging.iterdir())
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp (and safetensors' writer) make them private: an
        for file in staging.iterdir():                 # export is an ordinary folder of ordinary files
            os.chmod(file, 0o666 & ~current_umask())
        _replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(out, size, "a transformers GPT-2 directory", time.perf_counter() - start, lines)


def _replace_directory(staging: Path, out: Path) -> None:
    """Move the finished directory into place; an old one is removed only once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def training_sample(metadata: dict[str, str]) -> str:
    """Up to ROUND_TRIP_CHARACTERS of the text the model was trained on, when it can be read here."""
    try:
        return load_corpus(DataSource.recorded(metadata)).text("train", ROUND_TRIP_CHARACTERS)
    except Exception:  # the data may be gone or unreachable: the vocabulary check below still runs
        return ""


def verify_directory(folder: Path, model: MiniGPT, tokenizer: CharTokenizer, sample: str) -> list[str]:
    """Load `folder` with transformers and hold it to minigpt: logits, greedy tokens, the tokenizer round trip."""
    transformers = require_transformers()
    with quiet():
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = model.config
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, config.vocab_size, size=(2, config.block_size)))
    with torch.inference_mode():
        worst = float((hf_model(ids).logits - model(ids)[0]).abs().max())
    if not worst <= LOGIT_TOLERANCE:
        raise MiniGPTError(f"transformers' logits differ from minigpt's by {worst:.2e} (> {LOGIT_TOLERANCE:.0e}); "
                           "the export is wrong, nothing was written")
    lines = [f"logits vs minigpt: max |delta| {worst:.2e} over 2 x {config.block_size} positions "
             f"(limit {LOGIT_TOLERANCE:.0e})"]

    prompt = [int(i) for i in rng.integers(0, config.vocab_size, size=min(8, config.block_size - 1))]
    count = min(VERIFY_NEW_TOKENS, config.block_size - len(prompt))  # GPT-2 positions end at the block
    ours = [int(step[0]) for step in generate_rows(KVCacheEngine(model), [prompt], count, Sampler(temperature=0))]
    with torch.inference_mode(), quiet():
        prompt_ids = torch.tensor([prompt])
        # An explicit mask: without one, generate() would take every id equal to pad_token_id for padding.
        theirs = hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=count,
                                   min_new_tokens=count, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    if theirs != ours:
        raise MiniGPTError("transformers' greedy tokens differ from minigpt's; the export is wrong, "
                           "nothing was written")
    lines.append(f"greedy {count} new tokens from model.generate: identical to minigpt's")

    texts = {"the vocabulary": "".join(tokenizer.chars)} if tokenizer.kind == "char" else \
        {"a Unicode sample": UNICODE_SAMPLE}
    texts["the training text"] = sample
    for name, text in texts.items():
        if not text:
            continue
        encoded = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if encoded != tokenizer.encode(text) or hf_tokenizer.decode(encoded) != text:
            raise MiniGPTError(f"the exported tokenizer does not round-trip {name} as minigpt's does; "
                               "nothing was written")
    checked = " and ".join(f"{name} ({len(text):,} characters)" for name, text in texts.items() if text)
    lines.append(f"tokenizer: same ids as minigpt and the same text back for {checked}")
    return lines
