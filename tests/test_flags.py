"""Every numeric flag of every command is range-checked where it is defined (`minigpt.config.Bounded`): an
out-of-range value exits 2 with one line naming the flag and what it takes, and touches no file."""

import argparse
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.cli import main
from minigpt.flags import build_parser
from minigpt.settings import Bounded

REQUIRED = {"attention": ["--prompt", "the"]}


def bounded_flags():
    """(command, flag, bounds) of every flag typed by a Bounded, read from the parser itself."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action.option_strings[0], action.type) for name, parser in commands.choices.items()
            for action in parser._actions if isinstance(action.type, Bounded)]


def outside(bounds: Bounded):
    """Values a flag with these bounds must refuse, as the user would type them."""
    numbers = [st.sampled_from(["nan", "inf", "-inf", "ten", ""])]
    if bounds.kind is int:
        numbers.append(st.just("1.5"))
        if bounds.low is not None:
            numbers.append(st.integers(max_value=int(bounds.low) - 1).map(str))
        if bounds.high is not None:
            numbers.append(st.integers(min_value=int(bounds.high) + 1).map(str))
    else:
        if bounds.low is not None:
            numbers.append(st.floats(max_value=bounds.low, exclude_max=True, allow_nan=False,
                                     allow_infinity=False).map(repr))
        if bounds.high is not None:
            numbers.append(st.floats(min_value=bounds.high, exclude_min=True, allow_nan=False,
                                     allow_infinity=False).map(repr))
        if bounds.above is not None:
            numbers.append(st.floats(max_value=bounds.above, allow_nan=False, allow_infinity=False).map(repr))
    return st.one_of(numbers)


FLAGS = bounded_flags()


def test_the_flags_are_found():
    found = {(command, flag) for command, flag, _ in FLAGS}
    assert {("train", "--steps"), ("train", "--warmup"), ("generate", "--top-p"), ("serve", "--port"),
            ("eval", "--batch-size"), ("export", "--opset"), ("attention", "--head")} <= found
    assert len(found) >= 35


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_out_of_range_value_is_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    command, flag, bounds = data.draw(st.sampled_from(FLAGS))
    value = data.draw(outside(bounds))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    code = main([command, *REQUIRED.get(command, []), f"{flag}={value}"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == "", (command, flag, value, err)
    assert flag in lines[0] and bounds.what in lines[0], lines[0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--warmup", "5000", "--steps", "2"], "--warmup 5000 is longer than the run (2 steps)"),
    (["serve", "--port", "0"], "--port: must be an integer from 1 to 65535"),
    (["serve", "--port", "70000"], "--port: must be an integer from 1 to 65535"),
    (["eval", "--batch-size", "-3"], "--batch-size: must be an integer of at least 1"),
    (["train", "--sample-tokens", "-1"], "--sample-tokens: must be an integer of at least 0"),
    (["train", "--seed", str(2**63)], "--seed: must be an integer from 0 to 2**63-1"),
])
def test_the_cases_the_issue_names(argv, fragment, cli_error):
    cli_error(argv, fragment)


def test_a_misspelt_command_or_choice_gets_the_closest_one(cli_error):
    cli_error(["genrate"], "invalid choice: 'genrate'", "did you mean generate?")
    cli_error(["generate", "--engine", "onx"], "did you mean onnx?")
    cli_error(["generate", "--max-new-token", "5"], "did you mean --max-new-tokens?")  # no abbreviations
