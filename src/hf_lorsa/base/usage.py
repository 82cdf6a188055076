"""What every command checks of its options and does at its boundary: a problem the user can fix is a `UsageError`
whose message names the option and the fix, and a command ends with that message, not a traceback."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from ..embedded import MODELS, is_embedded
from .locations import looks_like_a_path, nearest_existing

DTYPES = ("auto", "float32", "bfloat16", "float16")


def is_int(value) -> bool:
    """An integer, and not a bool (True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


class UsageError(ValueError):
    """A problem with the options the user gave; the message names the option and the fix."""


class CommandStopped(RuntimeError):
    """A job that cannot go on (a training that diverged, say); its message says what happened and what to do."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = is_int(value) and value >= minimum
    require(ok, f"--{name} must be an integer >= {minimum}, got {value!r}.")


def check_float(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, f"--{name} must be a number in {interval}, got {value!r}.")


def check_model_name(name: str, option: str = "model_name_or_path") -> None:
    """A local folder that exists, an embedded host (`hf_lorsa:stories260K`), or something shaped like a Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    require(isinstance(name, str) and name.strip() != "", f"--{option} is required (a Hub id or a local folder).")
    if is_embedded(name):
        require(name in MODELS, f"--{option} {name}: the package embeds only {', '.join(sorted(MODELS))}.")
        return
    path = Path(name).expanduser()
    if path.exists():
        require(path.is_dir(), f"--{option} {name} is a file; give the model's folder (with config.json).")
        return
    require(not looks_like_a_path(name), f"--{option} {name}: no such folder.")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise UsageError(f"--{option} {name!r} is neither an existing folder nor a Hub id ('org/name').") from err


def check_writable_dir(path: str | Path, option: str) -> None:
    """`path` is (or can become) a folder we can write into: not a file, not under a file, writable."""
    path = Path(path).expanduser().absolute()
    require(not path.exists() or path.is_dir(), f"--{option} {path} is a file; give a folder.")
    existing = nearest_existing(path)
    require(existing.is_dir(), f"--{option} {path} lies under {existing}, which is a file; give another folder.")
    try:  # os.access says yes to root on read-only file systems: try for real
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UsageError(f"--{option} {path}: cannot write into {existing} ({err.strerror}).") from err


def check_layer_options(layer: int | None, layers: str | None) -> None:
    """--layer or --layers, not both; --layers checked as far as it can be without the host (syntax, duplicates,
    emptiness), the range once the host's depth is known."""
    require((layer is None) != (layers is None),
            "Give --layer L (one Lorsa) or --layers (several from one host pass), not both." if layer is not None
            else "--layer is required (or --layers for several layers).")  # fmt: skip
    check_int("layer", layer, minimum=0, optional=True)
    if layers is not None:
        parse_layers(layers, None)


def parse_layers(spec: str, n_layers: int | None) -> list[int]:
    """`2,4,6`, `0-29:3` (a range with its ends and an optional step), `all`, or a mix: the sorted layers. Without
    `n_layers`, only what can be checked without the host (syntax, duplicates, emptiness)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_layers)) if n_layers is not None else []
    layers: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*(?::\s*(\d+)\s*)?)?", part)
        require(match is not None, f"--layers {spec!r}: {part.strip()!r} is not a layer, a range a-b[:step] or 'all'.")
        start, end, step = match.group(1), match.group(2), match.group(3)
        end = start if end is None else end
        require(int(end) >= int(start) and (step is None or int(step) > 0),
                f"--layers {spec!r}: the range {part.strip()!r} is empty.")  # fmt: skip
        layers += list(range(int(start), int(end) + 1, int(step or 1)))
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    require(not repeated, f"--layers {spec!r} names layer(s) {repeated} more than once.")
    if n_layers is not None:
        outside = [layer for layer in layers if layer >= n_layers]
        require(
            not outside, f"--layers {spec!r}: layer(s) {outside} do not exist; the model has layers 0-{n_layers - 1}."
        )
    return sorted(layers)


def quiet_when_not_a_terminal() -> None:
    """No progress bars (carriage-return floods) when the output goes to a file or a pipe."""
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def command_line(prog: str):
    """What every hf-lorsa command does at its boundary: progress bars only on a terminal, and a problem the
    user can fix ends the command with its message and exit code 2, not a traceback (set
    HF_LORSA_TRACEBACK=1 to see one)."""
    quiet_when_not_a_terminal()
    try:
        yield
    except (ValueError, OSError, CommandStopped) as err:
        if os.environ.get("HF_LORSA_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
