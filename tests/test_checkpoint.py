import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minigpt import CharTokenizer, GPTConfig, MiniGPT, load_checkpoint, save_checkpoint
from minigpt.checkpoint import atomic_write_bytes
from minigpt.errors import CheckpointError

CONFIG = GPTConfig(vocab_size=6, block_size=8, embed_dim=16, num_heads=2, num_layers=2)
TOKENIZER = CharTokenizer("abcdef")


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return MiniGPT(CONFIG).eval()


def logits_of(model):
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])
    with torch.no_grad():
        return model(idx)[0]


def test_round_trip_gives_identical_logits_with_no_flags(tmp_path):
    model = fresh_model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, TOKENIZER, step=42, data="somewhere")
    loaded = load_checkpoint(path)
    assert loaded.model.config == CONFIG
    assert loaded.tokenizer == TOKENIZER
    assert loaded.step == 42 and loaded.metadata["data"] == "somewhere"
    assert torch.equal(logits_of(loaded.model), logits_of(model))
    # the head is stored once and re-tied on load
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.tok_emb.weight.data_ptr()


def raw_save(path, tensors, config=CONFIG, vocab="abcdef"):
    metadata = {"config": config.to_json(), "vocab": json.dumps(vocab)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = fresh_model()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    raw_save(tmp_path / "ddp.safetensors", state)
    assert torch.equal(logits_of(load_checkpoint(tmp_path / "ddp.safetensors").model), logits_of(model))


def test_mismatched_tensors_are_named(tmp_path):
    state = {k: v for k, v in fresh_model().state_dict().items() if k != "lm_head.weight"}
    del state["blocks.1.mlp.fc.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(2)
    raw_save(tmp_path / "bad.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "missing: blocks.1.mlp.fc.bias" in message
    assert "unexpected: extra.weight" in message
    assert "blocks.0.attn.qkv.weight (3, 3) vs (48, 16)" in message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found.*minigpt train"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, fresh_model(), TOKENIZER)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_metadata_must_be_present_and_consistent(tmp_path):
    state = {k: v for k, v in fresh_model().state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no 'config'"):
        load_checkpoint(tmp_path / "plain.safetensors")
    raw_save(tmp_path / "vocab.safetensors", state, vocab="abc")
    with pytest.raises(CheckpointError, match="vocab has 3 tokens"):
        load_checkpoint(tmp_path / "vocab.safetensors")


def test_legacy_pt_state_dict_is_imported_without_pickle(tmp_path):
    model = fresh_model()
    blob = {"model": model.state_dict(), "config": json.loads(CONFIG.to_json()), "vocab": "abcdef"}
    torch.save(blob, tmp_path / "old.pt")
    assert torch.equal(logits_of(load_checkpoint(tmp_path / "old.pt").model), logits_of(model))


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    # Any object beyond tensors and plain containers would need real unpickling.
    torch.save({"model": {}, "payload": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old contents")

    def crash(*args):
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old contents"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_unwritable_folder_is_a_clear_error(tmp_path):
    from minigpt import MiniGPTError

    with pytest.raises(MiniGPTError, match="cannot write to"):
        save_checkpoint(tmp_path / "missing" / "m.safetensors", fresh_model(), TOKENIZER)
