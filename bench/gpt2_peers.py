"""The peers a user would pick instead, built from the very same weights the way a user would build them.

Both start from a model's `minigpt export --hf` directory:
`hf_gpt2(directory)`: transformers' `AutoModelForCausalLM` on it.
`CTranslate2Peer(directory, quantization)`: that directory converted by CTranslate2's `TransformersConverter`
(what `ct2-transformers-converter --model DIR` runs), then made loadable (`ctranslate2_loadable`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def hf_gpt2(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def ctranslate2_loadable(ct2_dir: Path) -> None:
    """CTranslate2 insists on names for its start, end and unknown tokens, which a character model has none of.

    Name the first character for all three (generation below never stops early: it asks for exact lengths).
    """
    config_path = ct2_dir / "config.json"
    vocabulary = json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(bos_token=vocabulary[0], eos_token=vocabulary[0], unk_token=vocabulary[0])
    config_path.write_text(json.dumps(config), encoding="utf-8")


class CTranslate2Peer:
    def __init__(self, directory: Path, quantization: str = "float32", threads: int = 1):
        import ctranslate2

        ct2_dir = directory.parent / f"ct2-{quantization}"
        if not ct2_dir.exists():
            ctranslate2.converters.TransformersConverter(str(directory)).convert(str(ct2_dir),
                                                                                 quantization=quantization)
            ctranslate2_loadable(ct2_dir)
        self.vocabulary = json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
        self.generator = ctranslate2.Generator(str(ct2_dir), device="cpu", intra_threads=threads, inter_threads=1)

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
        """(rows, new_tokens) greedy continuation ids of each prompt, exactly new_tokens long."""
        results = self.generator.generate_batch(
            [[self.vocabulary[i] for i in prompt] for prompt in prompts], max_length=new_tokens,
            min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False, end_token=[])
        return np.array([result.sequences_ids[0] for result in results])
