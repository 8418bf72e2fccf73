"""The peers a user would pick instead, built from the very same weights.

`hf_gpt2(model)`: transformers' GPT2LMHeadModel holding a MiniGPT's tensors.
`ctranslate2_generator(model, folder, quantization)`: that model saved as a
HuggingFace directory and converted with CTranslate2's TransformersConverter,
exactly as a user would (`ct2-transformers-converter --model DIR`). Token
names are stand-ins ("<0>", "<1>", ...): the benchmark feeds ids, not text.
"""

from __future__ import annotations

from pathlib import Path

from minigpt.export.gpt2 import gpt2_config, gpt2_state_dict
from minigpt.model import MiniGPT


def token_names(vocab_size: int) -> list[str]:
    return [f"<{i}>" for i in range(vocab_size)]


def hf_gpt2(model: MiniGPT):
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config(model.config)))
    hf.load_state_dict({name: tensor.contiguous() for name, tensor in
                        gpt2_state_dict(model.state_dict()).items()}, strict=False)
    return hf.eval()


def ctranslate2_generator(model: MiniGPT, folder: Path, quantization: str = "float32", threads: int = 1):
    import ctranslate2
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    names = token_names(model.config.vocab_size)
    hf_dir, ct2_dir = folder / "hf", folder / f"ct2-{quantization}"
    if not hf_dir.exists():
        hf_gpt2(model).save_pretrained(hf_dir)
        tokenizer = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token=names[0]))
        transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=names[0], eos_token=names[0],
                                             unk_token=names[0]).save_pretrained(hf_dir)
    if not ct2_dir.exists():
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization=quantization)
    return ctranslate2.Generator(str(ct2_dir), device="cpu", intra_threads=threads, inter_threads=1)


def ctranslate2_greedy(generator, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each prompt, exactly `new_tokens` long (the end token is never chosen early)."""
    results = generator.generate_batch([[f"<{i}>" for i in prompt] for prompt in prompts], max_length=new_tokens,
                                       min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False)
    return [result.sequences_ids[0] for result in results]
