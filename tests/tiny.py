"""The tiny model every fast test trains: its text and size, and lm-eval run over it."""

import json
import math
import random
import subprocess
import sys

TINY_TEXT = ("the quick brown fox jumps over the lazy dog.\n"
             "a small model learns to spell one character at a time.\n") * 40
TINY_MODEL = dict(block_size=16, embed_dim=32, num_heads=2, num_layers=2)
# lm-eval's rolling windows are `minigpt eval`'s own when the text is whole blocks (else its last window is cut
# differently): 200 of the tiny model's, words of TINY_TEXT in a seeded order (not periodic, as TINY_TEXT is).
_pick = random.Random(0)
LM_EVAL_TEXT = " ".join(_pick.choice(TINY_TEXT.split(" ")) for _ in range(700))[:3200]


def eval_bits(loaded, text) -> float:
    """`minigpt eval`'s bits per character of a text: every character scored, the first after a newline."""
    import numpy as np

    from minigpt.generation import evaluate_split

    return evaluate_split(loaded.model, np.array(loaded.tokenizer.encode("\n" + text))) / math.log(2)


def lm_eval_tasks(folder, text, prompts, max_gen_toks):
    """As lm-eval's local tasks (yaml, json data): loglikelihood_rolling over a text, generate_until over prompts."""
    (folder / "text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    for name, data, kind, extra in (
            ("minigpt_text", "text.jsonl", "loglikelihood_rolling",
             'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'),
            ("minigpt_prompts", "prompts.jsonl", "generate_until",
             'doc_to_text: "{{prompt}}"\ndoc_to_target: ""\ngeneration_kwargs:\n  until: ["\\n"]\n'
             f'  max_gen_toks: {max_gen_toks}\nmetric_list:\n  - metric: exact_match\n')):
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {folder / data}\ntest_split: test\noutput_type: {kind}\n"
                                             + extra)


def run_lm_eval(folder, model, model_args, text, prompts, max_gen_toks=30):
    """lm-eval's CLI on those tasks (no prompts: the text alone): (bits per byte of the text, {prompt: its greedy
    generation})."""
    lm_eval_tasks(folder, text, prompts, max_gen_toks)
    tasks = "minigpt_text,minigpt_prompts" if prompts else "minigpt_text"
    # Run from the task folder, as a user's `lm_eval` would run from anywhere: `python -m` puts the working
    # directory first on sys.path, and from this repository's root its kernels/ folder would shadow the
    # `kernels` package transformers imports.
    result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                             "--tasks", tasks, "--include_path", str(folder),
                             "--output_path", str(folder / "out"), "--log_samples"],
                            capture_output=True, text=True, timeout=300, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (folder / "out").rglob("results_*.json")
    bits = json.loads(results.read_text())["results"]["minigpt_text"]["bits_per_byte,none"]
    samples = list((folder / "out").rglob("samples_minigpt_prompts_*.jsonl"))
    lines = [json.loads(line) for path in samples for line in path.read_text().splitlines()]
    return bits, {line["doc"]["prompt"]: line["resps"][0][0] for line in lines}


# Accents, CJK, emoji (four UTF-8 bytes), a zero-width joiner sequence: characters the BPE never merged.
UNICODE_TEXT = ("the quick brown fox jumps over the lazy dog.\nnaïve café, déjà vu; 東京 and 北京 😀 👩‍💻\n"
                "a dog is not a fox, and a fox is not a dog.\n") * 40
BPE_MODEL = ["--block-size", "32", "--embed-dim", "32", "--num-heads", "2", "--num-layers", "2"]
