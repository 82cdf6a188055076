"""Answer a command's `--help` and its option errors from a snapshot of its parser, without building the parser.

`hf-lorsa train` takes transformers' TrainingArguments as options, and the class cannot be imported without
transformers importing peft, which imports transformers' modeling code: 4-5 s on two cores before a word of help
(BENCHMARKS.md, "Start-up"). The first time a command builds its parser, `save` writes what argparse needs to give
the same answers: the help texts, the usage line, and every option's strings, arity, choices and whether it is
required. The next `--help`, or a command line argparse refuses (an unknown or ambiguous option, a required option
missing, a value outside its choices), is answered from that file in a fraction of a second, word for word as the
parser itself would answer. A command line the snapshot accepts goes on to the real parser, which checks the values.

Snapshots live in `$HF_LORSA_CACHE` (default `~/.cache/hf_lorsa`), one per command, keyed by everything the texts
depend on: the versions of Python and of the libraries that define options, the package's own source, and the
terminal's width (argparse wraps the help to it). A snapshot that does not match, or cannot be read, is ignored; one
that cannot be written is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .writing import write_atomically

HELP_FLAGS = ("-h", "--help", "--help-all")


def folder() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_lorsa"
    return Path(os.environ.get("HF_LORSA_CACHE") or default)


def key(libraries: tuple[str, ...]) -> str:
    """What the parser's texts depend on: Python, the libraries' versions, this package's source, the width."""
    digest = hashlib.sha256(sys.version.encode())
    for name in libraries:
        try:
            digest.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.read_bytes())
    digest.update(str(shutil.get_terminal_size().columns).encode())
    return digest.hexdigest()


def snapshot_path(command: str) -> Path:
    return folder() / f"{command.replace(' ', '-')}-options.json"


def save(command: str, libraries: tuple[str, ...], build) -> None:
    """Record the parser `build(show_all)` makes for `command` (called with the real parser at hand)."""
    brief, full = build(False), build(True)
    options = [
        {"strings": list(a.option_strings), "dest": a.dest, "nargs": a.nargs, "required": a.required,
         "choices": [str(c) for c in a.choices] if a.choices is not None else None,
         "flag": a.nargs == 0}
        for a in brief._actions if a.option_strings and a.dest not in ("help", "help_all")
    ]  # fmt: skip
    record = {"key": key(libraries), "usage": brief.format_usage(), "help": brief.format_help(),
              "help_all": full.format_help(), "options": options}  # fmt: skip
    try:
        write_atomically(snapshot_path(command), json.dumps(record))
    except OSError:  # a read-only home: the answers come from the real parser, as before
        pass


def load(command: str, libraries: tuple[str, ...]) -> dict | None:
    try:
        record = json.loads(snapshot_path(command).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key(libraries) else None


class Refused(Exception):
    """The snapshot's parser ended the command line's reading (argparse's exit, caught): `status` is its exit code."""

    def __init__(self, status: int):
        self.status = status


class SnapshotParser(argparse.ArgumentParser):
    def exit(self, status=0, message=None):
        if message:
            self._print_message(message, sys.stderr)
        raise Refused(status)


class CachedHelp(argparse.Action):
    """-h/--help or --help-all: print the recorded text and stop, where argparse meets it (as the real one does)."""

    def __init__(self, option_strings, dest, text: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(self.text)
        parser.exit()


def answer(command: str, libraries: tuple[str, ...], argv: list[str]) -> int | None:
    """The exit code of `command`'s answer to `argv` where the snapshot gives it (help, or an option error, printed
    as the real parser prints them); None where the real parser must read `argv` (no snapshot, or argv passes)."""
    record = load(command, libraries)
    if record is None:
        return None
    parser = SnapshotParser(prog=command, usage=argparse.SUPPRESS, add_help=False)
    parser.format_usage = lambda: record["usage"]
    # with --help-all anywhere, the real command builds the parser that lists every option, and -h prints that too
    parser.add_argument("-h", "--help", action=CachedHelp, text=record["help_all" if "--help-all" in argv else "help"])
    parser.add_argument("--help-all", action=CachedHelp, text=record["help_all"])
    for option in record["options"]:
        if option["flag"]:
            parser.add_argument(*option["strings"], dest=option["dest"], action="store_const", const=True,
                                required=option["required"])  # fmt: skip
        else:
            const = {"const": True} if option["nargs"] == "?" else {}
            parser.add_argument(*option["strings"], dest=option["dest"], nargs=option["nargs"],
                                required=option["required"], choices=option["choices"], **const)  # fmt: skip
    try:
        parser.parse_args(argv)  # argparse refuses leftovers itself, in the words `unrecognized` copies
    except Refused as refused:
        return refused.status
    return None


def unrecognized(unused: list[str]) -> str:
    """argparse's own words for options a parser does not take."""
    return f"unrecognized arguments: {' '.join(unused)}"
