"""The checkpoint: one .safetensors file that says what model it holds.

Its `__metadata__` carries `config` (JSON of every GPTConfig field), `vocab`
(the tokenizer's characters as a JSON string) or, for a BPE model, `tokenizer`
(its tokenizer.json), the training `step` and the
`data` it was trained on, so loading needs no flags. The LM head is tied to
the token embedding and is stored once. Nothing on any load path unpickles.

Checkpoints written during training also carry what `--resume` needs: the
AdamW moments as `optimizer.{param}.{name}` tensors, and the optimizer's
hyperparameters (`optimizer`) and the training settings (`train_config`) as
JSON metadata. Batches and dropout are seeded from the step, so the step is
the whole of the random state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from minigpt.config import GPTConfig
from minigpt.data import DataSource
from minigpt.errors import CheckpointError, MiniGPTError
from minigpt.model import MiniGPT
from minigpt.paths import atomic_write_bytes, checkpoint_kind
from minigpt.subword import TOKENIZER_META, token_spellings, tokenizer_from_metadata
from minigpt.tokenizer import CharTokenizer

OPTIMIZER_PREFIX = "optimizer."
DRAFT_PREFIX = "draft."  # the n-gram draft table (`minigpt.drafts`), beside the weights
TIED_KEYS = ("lm_head.weight",)  # shares storage with tok_emb.weight; saved once
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile


@dataclass
class Checkpoint:
    model: MiniGPT
    tokenizer: CharTokenizer
    metadata: dict[str, str] = field(default_factory=dict)
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    path: str = ""  # what it was loaded from
    draft_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def ngram_draft(self):
        """The n-gram draft table `minigpt train` stored with the model (`minigpt.drafts`), or None."""
        from minigpt.drafts import NGRAM_META, NGramDraft

        if NGRAM_META not in self.metadata or not self.draft_tensors:
            return None
        try:
            return NGramDraft.from_tensors({k: v.numpy() for k, v in self.draft_tensors.items()},
                                           json.loads(self.metadata[NGRAM_META]), self.tokenizer.vocab_size)
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{self.path} has a damaged n-gram draft table; use --draft context") from None

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    def optimizer_state(self) -> dict | None:
        """The AdamW state_dict saved with this checkpoint, or None if it has none."""
        if "optimizer" not in self.metadata:
            return None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in self.optimizer_tensors.items():
            index, name = key[len(OPTIMIZER_PREFIX):].split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        return {"state": state, "param_groups": json.loads(self.metadata["optimizer"])}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, tokenizer: CharTokenizer, *,
                    step: int = 0, data: DataSource | str | None = None,
                    optimizer: torch.optim.Optimizer | None = None, train_config: dict | None = None,
                    draft=None) -> None:
    """Weights, config, vocabulary, the step and the data it was trained on (and, to resume, the optimizer
    state and training settings) in one .safetensors file, written atomically."""
    model = _unwrap(model)
    tensors = {name: tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items() if name not in TIED_KEYS}
    metadata = {"format": "minigpt", "config": model.config.to_json(), **tokenizer.metadata(),
                "step": str(step), "data": str(data or "")}
    if data:
        metadata["data_source"] = (DataSource.parse(data) if isinstance(data, str) else data).to_json()
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, moments in state["state"].items():
            for name, tensor in moments.items():
                tensors[f"{OPTIMIZER_PREFIX}{index}.{name}"] = tensor.detach().cpu().contiguous()
        metadata["optimizer"] = json.dumps(state["param_groups"])
    if train_config is not None:
        metadata["train_config"] = json.dumps(train_config)
    if draft is not None:  # a `minigpt.drafts.NGramDraft`: its table as tensors, its settings in the metadata
        from minigpt.drafts import NGRAM_META

        tensors.update({name: torch.from_numpy(array) for name, array in draft.tensors().items()})
        metadata[NGRAM_META] = json.dumps(draft.settings())
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild model and tokenizer from a .safetensors checkpoint, a directory written by `minigpt export --hf`
    (or any GPT-2 directory with a character-level tokenizer.json), or a legacy .pt."""
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "folder":
        state_dict, metadata = _read_hf_directory(path)
    elif kind == "pt":
        state_dict, metadata = _read_legacy_pt(path)
    else:
        state_dict, metadata = _read_safetensors(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no 'config' in its metadata; it was not written by minigpt")
    try:
        config = GPTConfig.from_json(metadata["config"])
    except MiniGPTError as exc:
        raise CheckpointError(f"{path} has bad metadata: {exc}") from None
    tokenizer = tokenizer_from_metadata(metadata, str(path))
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path} has bad metadata: vocab has {tokenizer.vocab_size} tokens "
                              f"but config.vocab_size is {config.vocab_size}")
    state_dict = _strip_prefixes(path, state_dict)
    optimizer_tensors = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(OPTIMIZER_PREFIX)}
    draft_tensors = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(DRAFT_PREFIX)}
    layers_in_file = {name.split(".")[1] for name in state_dict if name.startswith("blocks.")}
    if len(layers_in_file) != config.num_layers:
        raise CheckpointError(f"{path} does not match its config: it holds {len(layers_in_file)} layers "
                              f"but config.num_layers is {config.num_layers}")
    # Check names and shapes on a model without storage first, so a config
    # claiming billions of parameters costs nothing before it is refused.
    with torch.device("meta"):
        expected = {name: t.shape for name, t in MiniGPT(config).state_dict().items() if name not in TIED_KEYS}
    weights = _match_state_dict(path, expected, state_dict)
    model = MiniGPT(config)
    # Not strict: the tied LM head is filled through the token embedding.
    model.load_state_dict(weights, strict=False)
    return Checkpoint(model.to(device).eval(), tokenizer, metadata, optimizer_tensors, str(path), draft_tensors)


@dataclass
class WarmStart:
    """What `warm_start` copied into a new model, and what it left and why."""

    source: str
    checkpoint_tensors: int
    model_tensors: int
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    characters: str = ""  # "60 of 65 characters" when embedding rows were copied by character

    def __str__(self) -> str:
        embedding = f" (token embedding: {self.characters})" if self.characters else ""
        shown = "; ".join(f"{name} ({why})" for name, why in list(self.skipped.items())[:4])
        more = f" and {len(self.skipped) - 4} more" if len(self.skipped) > 4 else ""
        skipped = f", skipped {len(self.skipped)}: {shown}{more}" if self.skipped else ""
        return (f"--init-from {self.source}: {self.checkpoint_tensors} tensors in the checkpoint, "
                f"{self.model_tensors} in the model; copied {len(self.copied)}{embedding}{skipped}")


@torch.no_grad()
def warm_start(model: MiniGPT, tokenizer: CharTokenizer, source: Checkpoint) -> WarmStart:
    """Copy into `model` every tensor of `source` whose name and shape match; the token embedding row by
    row for the characters both vocabularies have (when its width matches). The rest keeps its fresh
    initialisation. Reuses a checkpoint after the architecture or the corpus changed."""
    theirs = {k: v for k, v in source.model.state_dict().items() if k not in TIED_KEYS}
    ours = {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS}
    report = WarmStart(source.path, len(theirs), len(ours))
    for key, tensor in ours.items():
        if key not in theirs:
            report.skipped[key] = "not in the checkpoint"
        elif key == "tok_emb.weight" and source.tokenizer != tokenizer and theirs[key].shape[1] == tensor.shape[1]:
            theirs_at = {token: index for index, token in enumerate(token_spellings(source.tokenizer))}
            shared = [(index, theirs_at[token]) for index, token in enumerate(token_spellings(tokenizer))
                      if token in theirs_at]
            rows, from_rows = torch.tensor(shared, dtype=torch.long).reshape(-1, 2).T
            tensor[rows] = theirs[key][from_rows].to(tensor.dtype)
            report.copied.append(key)
            report.characters = f"{len(shared)} of {tokenizer.vocab_size} " + \
                ("characters" if tokenizer.kind == "char" else "BPE tokens")
        elif theirs[key].shape != tensor.shape:
            report.skipped[key] = f"shape {tuple(theirs[key].shape)} in the checkpoint, {tuple(tensor.shape)} here"
        else:
            tensor.copy_(theirs[key])
            report.copied.append(key)
    if not report.copied:  # a warm start that copies nothing is a fresh start the user did not ask for
        key, reason = next(iter(report.skipped.items()))
        raise CheckpointError(f"--init-from {source.path} fits nothing of this model: no tensor has the same name "
                              f"and shape ({key}: {reason}); give the architecture it was trained with, or drop "
                              "--init-from")
    return report


def _unwrap(model: torch.nn.Module) -> MiniGPT:
    """The MiniGPT inside a DDP or torch.compile wrapper."""
    while not isinstance(model, MiniGPT):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A checkpoint's metadata alone (its config, vocab, step, data...), without reading the weights."""
    checkpoint_kind(path)
    return _read_safetensors(Path(path), with_tensors=False)[1]


def _read_safetensors(path: Path, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors else {}
    except Exception as exc:  # safetensors raises several types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({reason}); "
                              "it may be truncated or corrupt: retrain or restore it") from None
    return tensors, metadata


def _read_legacy_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `torch.save`d dict {"model": state_dict, "config": {...}, "vocab": "chars"}, loaded without pickle."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable weights-only .pt file ({reason})") from None
    if not (isinstance(blob, dict) and isinstance(blob.get("model"), dict)):
        raise CheckpointError(f"{path} must hold a dict with 'model' (state dict), 'config' (dict) "
                              "and 'vocab' (string of characters)")
    metadata = {"step": str(blob.get("step", 0))}
    if isinstance(blob.get("config"), dict):
        metadata["config"] = json.dumps(blob["config"])
    if isinstance(blob.get("vocab"), str):
        metadata["vocab"] = json.dumps(blob["vocab"], ensure_ascii=False)
    return blob["model"], metadata


def _read_hf_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A HuggingFace GPT-2 directory with a character-level tokenizer, as `minigpt export --hf` writes it."""
    from minigpt.export.gpt2 import minigpt_config_fields, minigpt_state_dict

    not_ours = f"{path} is a directory but not a minigpt/GPT-2 export"
    files = {name: path / name for name in ("config.json", "tokenizer.json", "model.safetensors")}
    missing = [name for name, file in files.items() if not file.is_file()]
    if missing:
        raise CheckpointError(f"{not_ours} (no {', '.join(missing)}); pass a .safetensors checkpoint or a "
                              "directory written by `minigpt export --hf`")
    try:
        hf_config = json.loads(files["config.json"].read_text(encoding="utf-8"))
        fields = minigpt_config_fields(hf_config)
        tokenizer_text = files["tokenizer.json"].read_text(encoding="utf-8")
        tokenizer_spec = json.loads(tokenizer_text)
        tokenizer_model = tokenizer_spec.get("model", {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{not_ours}: {exc}") from None
    vocab = tokenizer_model.get("vocab") or {}
    chars = sorted(vocab, key=vocab.get)
    if tokenizer_model.get("type") == "BPE" and (tokenizer_spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        tokens = {TOKENIZER_META: tokenizer_text}  # a byte-level BPE, as minigpt's subword models export
    elif tokenizer_model.get("type") == "WordLevel" and all(len(c) == 1 for c in chars) and chars == sorted(chars):
        tokens = {"vocab": json.dumps("".join(chars), ensure_ascii=False)}
    else:
        raise CheckpointError(f"{not_ours}: its tokenizer is neither minigpt's character-level one (one token per "
                              "character, in sorted order) nor a byte-level BPE; only those GPT-2 models load here")
    tensors, _ = _read_safetensors(files["model.safetensors"])
    metadata = {"format": "minigpt", "config": json.dumps(fields), **tokens,  # validated as any checkpoint's
                "step": str(hf_config.get("minigpt_step", 0)), "data": str(hf_config.get("minigpt_data", ""))}
    return minigpt_state_dict(tensors), metadata


def _strip_prefixes(path: Path, state_dict: dict) -> dict[str, torch.Tensor]:
    """Names as MiniGPT has them: without the prefixes DDP and torch.compile add."""
    cleaned = {}
    for name, tensor in state_dict.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path} holds a non-tensor entry {name!r} among its weights")
        cleaned[name] = tensor
    return cleaned


def _match_state_dict(path: Path, expected: dict[str, torch.Size], cleaned: dict) -> dict[str, torch.Tensor]:
    """Check names and shapes against the config's, naming every mismatch at once."""
    for name in TIED_KEYS:
        cleaned.pop(name, None)
    missing = sorted(expected.keys() - cleaned.keys())
    unexpected = sorted(cleaned.keys() - expected.keys())
    misshaped = [f"{name} {tuple(cleaned[name].shape)} vs {tuple(shape)}"
                 for name, shape in expected.items()
                 if name in cleaned and cleaned[name].shape != shape]
    if missing or unexpected or misshaped:
        problems = [f"{label}: {', '.join(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs config)", misshaped))
                    if items]
        raise CheckpointError(f"{path} does not match its config; " + "; ".join(problems))
    return cleaned
