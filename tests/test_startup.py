"""A start-up that costs nothing it does not use: `hf-lorsa train --help` and its option errors come from a snapshot
of the parser (hf_lorsa.base.parser_snapshot), word for word what the parser itself answers, without loading
transformers' TrainingArguments (BENCHMARKS.md, "Start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_lorsa.base import parser_snapshot
from hf_lorsa.training import arguments
from hf_lorsa.training.command import COMMAND, OPTION_LIBRARIES

REQUIRED = ["--model_name_or_path", "m", "--dataset", "d", "--layer", "1"]
ANSWERED = [  # a help, or a command line argparse refuses: the snapshot answers
    ["--help"],
    ["-h"],
    ["--help-all"],
    ["--help", "--help-all"],  # the parser that lists every option is the one built, so -h prints it too
    ["--no_such_option", "1"],  # the required options missing come first
    [],
    [*REQUIRED, "--no_such_option", "1"],
    [*REQUIRED, "--lay", "2"],  # ambiguous: --layer or --layers
    [*REQUIRED, "--eval_strategy", "sometimes"],  # outside its choices
    [*REQUIRED, "--output_dir"],  # no value
    ["--eval_strategy", "sometimes", "--help"],  # the error comes first, as argparse reads in order
    ["--help", "--eval_strategy", "sometimes"],
    [*REQUIRED, "--bf16", "--no_such_option"],
]
PASSED = [  # values the snapshot cannot check go on to the real parser
    REQUIRED,
    [*REQUIRED, "--top_k", "two"],
    [*REQUIRED, "--bf16", "true", "--eval_strategy", "steps", "--max_memory", "0=1GiB"],
]


@pytest.fixture
def snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LORSA_CACHE", str(tmp_path))
    parser_snapshot.save(COMMAND, OPTION_LIBRARIES, lambda show_all: arguments.parser(show_all=show_all))
    return tmp_path / "hf-lorsa-train-options.json"


def real_answer(argv, capsys) -> tuple[int, str, str]:
    """What the parser itself prints and exits with (a command line it accepts: exit code None)."""
    try:
        arguments.parse(argv)
        code = None
    except SystemExit as stop:
        code = stop.code
    except ValueError:  # a value the options' own checks refuse (UsageError), after argparse accepted the line
        code = None
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot_answer(argv, capsys) -> tuple[int | None, str, str]:
    code = parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", ANSWERED, ids=" ".join)
def test_help_and_option_errors_from_the_snapshot_equal_the_parsers(snapshot, argv, capsys):
    real = real_answer(argv, capsys)
    assert real[0] is not None
    assert snapshot_answer(argv, capsys) == real


@pytest.mark.parametrize("argv", PASSED, ids=" ".join)
def test_a_command_line_the_snapshot_accepts_goes_on_to_the_parser(snapshot, argv, capsys):
    assert snapshot_answer(argv, capsys) == (None, "", "")


def test_a_snapshot_of_other_versions_or_sources_or_one_unreadable_is_not_used(snapshot, monkeypatch, capsys):
    record = json.loads(snapshot.read_text())
    assert record["key"] == parser_snapshot.key(OPTION_LIBRARIES)
    assert parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, ["--help"]) == 0
    snapshot.write_text(json.dumps({**record, "key": "transformers of another version"}))
    assert parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, ["--help"]) is None
    snapshot.write_text("{not json")
    assert parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, ["--help"]) is None
    snapshot.unlink()
    monkeypatch.setattr(parser_snapshot, "key", lambda libraries: "a terminal of another width")
    parser_snapshot.save(COMMAND, OPTION_LIBRARIES, lambda show_all: arguments.parser(show_all=show_all))
    assert json.loads(snapshot.read_text())["key"] == "a terminal of another width"


def test_a_folder_that_cannot_be_written_leaves_the_answers_to_the_parser(tmp_path, monkeypatch):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("HF_LORSA_CACHE", str(blocked))
    parser_snapshot.save(COMMAND, OPTION_LIBRARIES, lambda show_all: arguments.parser(show_all=show_all))
    assert parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, ["--help"]) is None


def test_the_command_answers_its_help_without_loading_the_training_options(tmp_path):
    # the first --help builds the parser and writes the snapshot; the second reads it, and loads neither torch nor
    # transformers (the 4-5 s that TrainingArguments costs); both print the same text
    code = (
        "import sys\nfrom hf_lorsa.training.command import main\ntry:\n    sys.exit(main(sys.argv[1:]))\nfinally:\n"
        "    print(sorted({'torch', 'transformers'} & set(sys.modules)), file=sys.stderr)"
    )
    env = {**os.environ, "HF_LORSA_CACHE": str(tmp_path), "COLUMNS": "100"}
    runs = [subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env)
            for _ in range(2)]  # fmt: skip
    assert [run.returncode for run in runs] == [0, 0]
    assert runs[0].stdout == runs[1].stdout and "--expansion_factor" in runs[0].stdout
    assert runs[0].stderr.strip().endswith("['torch', 'transformers']")
    assert runs[1].stderr.strip() == "[]"
