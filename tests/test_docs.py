"""The README and docs/ say what is true today: their links lead somewhere, every `minigpt ...` command they
quote parses with today's flags, and the learner's reading list gives each file's real length."""

import re
import shlex
from pathlib import Path

import pytest

from minigpt.flags import build_parser, parse

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def relative_links(text):
    """The targets of markdown links and images that are not URLs or in-page anchors."""
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    missing = [target for target in relative_links(text) if not (page.parent / target.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to what is not there: {missing}"


def quoted_commands(text):
    """Every `minigpt ...` command in the page's shell blocks, as argv (comments, pipes and && cut off)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|\||;|\|", line.split(" #", 1)[0]):
                words = shlex.split(part.strip()) if part.strip() else []
                if words[:1] == ["minigpt"]:
                    commands.append(words[1:])
    return commands


def test_the_pages_quote_commands_and_the_checker_refuses_a_stale_flag(capsys):
    everything = [command for page in PAGES for command in quoted_commands(page.read_text(encoding="utf-8"))]
    assert len(everything) >= 15 and {command[0] for command in everything} >= {"train", "generate", "serve",
                                                                              "export", "plot", "eval"}
    with pytest.raises(SystemExit):
        parse(build_parser(), ["generate", "--max-new-token", "5"])  # an abbreviation of a real flag
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "--stpes", "5"])
    capsys.readouterr()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_quoted_command_parses_with_todays_flags(page, capsys):
    for argv in quoted_commands(page.read_text(encoding="utf-8")):
        if argv[:1] in (["--version"], ["--help"]):
            continue
        try:
            parse(build_parser(), argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `minigpt {shlex.join(argv)}` does not parse: {capsys.readouterr().err}")


def learner_table():
    """{path: lines} and the stated total from the README's "Read the code in this order"."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Read the code in this order", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([\w/.]+)` \| ([\d,]+) \|", section, flags=re.M))
    (total,) = re.findall(r"\(([\d,]+) lines\)", section)
    return {path: int(count.replace(",", "")) for path, count in rows.items()}, int(total.replace(",", ""))


def test_the_learners_reading_list_gives_each_files_length_and_their_sum():
    rows, total = learner_table()
    assert len(rows) >= 8
    actual = {path: len((ROOT / path).read_text(encoding="utf-8").splitlines()) for path in rows}
    assert rows == actual, "the README's reading list has drifted from the files"
    assert total == sum(actual.values())


def test_the_learners_path_imports_no_layer():
    """Nothing on the path imports speculation, drafts, the server, DDP, compile, signals, locks or the
    draft-table build: those are layers on top of it."""
    rows, _ = learner_table()
    layers = ("speculative", "drafts", "draft_table", "serve", "distributed", "training_checks", "train",
              "fast_sampling", "triton_attention", "cli")
    for path in rows:
        imported = re.findall(r"^\s*(?:from|import) minigpt\.([\w.]+)", (ROOT / path).read_text(), flags=re.M)
        assert not [name for name in imported if name.split(".")[0] in layers or name == "kernels.backends"
                    and path != "minigpt/model.py"], (path, imported)


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
