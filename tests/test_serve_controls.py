"""The sampling controls and patterns through `minigpt generate` and `minigpt serve`: the openai client's
extra_body gets the CLI's text, patterns end the text where they are whole, a constrained request leaves its
neighbours' text alone, and bad values are one-line errors (exit 2, or 400 naming the field)."""

import concurrent.futures
import json
import re

import pytest

openai = pytest.importorskip("openai", reason="the server is tested with the openai client (the test extra)")
pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra")

from serving import MODEL_ID, generate_cli, running  # noqa: E402

PROMPT = "the "
# The same settings as flags and as request fields (token 3 is "a" in the tiny model's sorted characters).
CONTROLS = [
    (["--temperature", "0.9", "--seed", "4", "--min-p", "0.05", "--repetition-penalty", "1.3",
      "--presence-penalty", "0.4", "--frequency-penalty", "0.6", "--logit-bias", "a=-2.5", "--logit-bias", "o=1"],
     {"temperature": 0.9, "seed": 4, "min_p": 0.05, "repetition_penalty": 1.3, "presence_penalty": 0.4,
      "frequency_penalty": 0.6, "logit_bias": {"3": -2.5, "17": 1}}),
    (["--temperature", "0", "--regex", "[a-z]+ (fox|dog)\\."],
     {"temperature": 0, "guided_regex": "[a-z]+ (fox|dog)\\."}),
    (["--temperature", "1.2", "--seed", "9", "--choice", "lazy dog", "--choice", "quick fox", "--choice", "one"],
     {"temperature": 1.2, "seed": 9, "guided_choice": ["lazy dog", "quick fox", "one"]}),
]


@pytest.fixture(scope="module")
def server(tiny_onnx, free_port):
    with running(tiny_onnx, "--draft", "auto", port=free_port()) as server:
        yield server


def test_the_tiny_models_ids_are_what_the_table_says(tiny_loaded):
    assert tiny_loaded.tokenizer.encode("ao") == [3, 17]


@pytest.mark.parametrize("flags,fields", CONTROLS)
def test_extra_body_gets_the_text_minigpt_generate_prints(server, tiny_onnx, flags, fields):
    printed = generate_cli(tiny_onnx, "--prompt", PROMPT, "--max-new-tokens", "40", *flags)
    sent = dict(fields)
    body = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=sent.pop("temperature"),
                seed=sent.pop("seed", None), extra_body=sent)
    for n in (1, 2):
        completion = server.client().completions.create(n=n, **body)
        assert completion.choices[0].text == printed[len(PROMPT):-1]
    if "guided_regex" in fields or "guided_choice" in fields:
        pattern = fields.get("guided_regex") or "|".join(map(re.escape, fields["guided_choice"]))
        assert re.fullmatch(pattern, completion.choices[0].text)
        assert completion.choices[0].finish_reason == "stop"
    streamed = server.client().completions.create(stream=True, **body)
    assert "".join(chunk.choices[0].text for chunk in streamed) == printed[len(PROMPT):-1]


def test_a_pattern_cut_by_max_tokens_says_length(server):
    completion = server.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0,
                                                    extra_body={"guided_regex": "[a-z ]+\\."})
    assert completion.choices[0].finish_reason == "length" and len(completion.choices[0].text) == 5
    assert re.fullmatch("[a-z ]+", completion.choices[0].text)


def test_a_constrained_request_leaves_its_neighbours_text_alone(server):
    plain = dict(model=MODEL_ID, prompt="a small ", max_tokens=30, temperature=0.8, seed=1)
    alone = server.post(plain)[1]["choices"][0]["text"]
    constrained = dict(plain, guided_choice=["model", "dog"], presence_penalty=1.5, logit_bias={"5": 50}, seed=2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(server.post, [plain if i % 2 else constrained for i in range(8)]))
    for i, (status, body, _) in enumerate(answers):
        assert status == 200, body
        text = body["choices"][0]["text"]
        assert text == alone if i % 2 else text in ("model", "dog")


BAD = [
    ({"min_p": 1.5}, "min_p", "min_p must be a number from 0 to 1"),
    ({"min_p": "low"}, "min_p", "must be a number"),
    ({"repetition_penalty": 0}, "repetition_penalty", "above 0 and at most 2"),
    ({"presence_penalty": 3}, "presence_penalty", "from -2 to 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "from -2 to 2"),
    ({"frequency_penalty": 10**400}, "frequency_penalty", "from -2 to 2"),
    ({"logit_bias": {"29": 1}}, "logit_bias", "token ids from 0 to 28"),
    ({"logit_bias": {"a": 1}}, "logit_bias", "token ids from 0 to 28"),
    ({"logit_bias": {"3": 101}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": {"3": "up"}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": [3]}, "logit_bias", "an object of token ids"),
    ({"guided_regex": "a("}, "guided_regex", "not a valid regular expression"),
    ({"guided_regex": "Z+"}, "guided_regex", "cannot be written with this model's tokens"),
    ({"guided_regex": 5}, "guided_regex", "must be a string"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "give one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}},
     "response_format", "cannot be written with this model's tokens"),  # the tiny model has no digits
    ({"response_format": {"type": "json_object"}}, "response_format", '{"type": "json_schema"'),
    ({"guided_json": "{not json"}, "guided_json", "not a JSON schema"),
]


@pytest.mark.parametrize("fields,param,fragment", BAD)
def test_bad_controls_get_400_naming_the_field_and_the_server_keeps_serving(server, fields, param, fragment):
    status, body, _ = server.post({"model": MODEL_ID, "prompt": PROMPT, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param and fragment in body["error"]["message"], body
    assert server.post({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_nan_is_refused(server):
    status, body, _ = server.request("POST", "/v1/completions",
                                     b'{"model": "tiny", "prompt": "the ", "presence_penalty": NaN}')
    assert status == 400, body
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("argv,fragments", [
    (["--min-p", "2"], ["--min-p", "from 0 to 1"]),
    (["--repetition-penalty", "nan"], ["--repetition-penalty", "above 0"]),
    (["--logit-bias", "a=500"], ["--logit-bias", "-100 to 100"]),
    (["--logit-bias", "ab=1"], ["'ab' is 2 tokens"]),
    (["--regex", "a("], ["not a valid regular expression"]),
    (["--regex", "[0-9]+"], ["cannot be written with this model's tokens", "allow only characters"]),
    (["--choice", "a", "--regex", "b"], ["give one pattern"]),
    (["--json-schema", "[1, 2]"], ["not a JSON schema"]),
])
def test_bad_control_flags_exit_2_in_one_line(tiny_checkpoint, cli_error, argv, fragments):
    cli_error(["generate", "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "5", *argv], *fragments)


def test_a_json_schema_gives_json_it_accepts(bpe_checkpoint):
    """A byte-level BPE model can spell any JSON: the text parses and has the schema's fields and types."""
    from minigpt import generate, load_checkpoint

    loaded = load_checkpoint(bpe_checkpoint)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "maximum": 120}},
              "required": ["name", "age"]}
    for seed in range(3):
        text = generate(loaded.model, loaded.tokenizer, "", 80, temperature=1.0, seed=seed, json_schema=schema)
        document = json.loads(text)
        assert set(document) == {"name", "age"} and isinstance(document["name"], str), text
        assert isinstance(document["age"], int) and len(document["name"]) <= 8 and document["age"] <= 120


def test_min_p_through_the_python_api_equals_the_cli(tiny_loaded, tiny_checkpoint):
    from minigpt import generate

    text = generate(tiny_loaded.model, tiny_loaded.tokenizer, PROMPT, 30, temperature=1.0, seed=3, min_p=0.2,
                    repetition_penalty=1.5)
    assert text + "\n" == generate_cli(tiny_checkpoint, "--prompt", PROMPT, "--max-new-tokens", "30", "--seed", "3",
                                       "--min-p", "0.2", "--repetition-penalty", "1.5")
