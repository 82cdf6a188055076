"""The output folder of a training run: what may be written there, resumed from, or cleared.

A run writes only into an empty folder, into the folder of the same run (to resume it), or, with
`--overwrite_output_dir`, into the folder of an earlier run after removing that run's files. A folder
holding anything a run did not make (a model, the user's own files) is never written to. One run at a time: a
run holds the folder's lock file (its process id) from before it looks at the folder until it ends.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.usage import UsageError
from ..base.writing import write_atomically

logger = logging.getLogger(__name__)
LOCK_FILE = ".lorsa_lock"

RUN_FILE = "lorsa_run.json"
# Everything a run (training, evaluate, analyze) writes into its folder.
RUN_ENTRIES = (
    RUN_FILE, LOCK_FILE, "config.json", "model.safetensors", "README.md", "eval_results.json", "analysis", "runs",
    "lorsa_trainer_state.safetensors",
)  # fmt: skip
RUN_PATTERNS = ("checkpoint-*", "train_summary_rank*.json", "layer[0-9]*")  # layer{L}: one Lorsa of a release


def run_made(entry: Path) -> bool:
    return entry.name in RUN_ENTRIES or any(entry.match(p) for p in RUN_PATTERNS)


def read_run_file(folder: str | Path) -> dict | None:
    path = Path(folder, RUN_FILE)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if "signature" in record else {"signature": record, "status": "running"}  # older layout


def write_run_file(folder: str | Path, signature: dict, status: str, **extra) -> None:
    record = {"signature": signature, "status": status, **extra}
    write_atomically(Path(folder, RUN_FILE), json.dumps(record, indent=2))


@dataclass
class OutputFolder:
    """What the folder holds for this run: 'new' (start), 'resume' (continue) or 'finished' (nothing to do)."""

    path: Path
    state: str
    record: dict | None = None


def prepare(output_dir: str | Path, signature: dict, overwrite: bool) -> OutputFolder:
    """Decide, before anything expensive, whether this run may use the folder; clear it when asked to."""
    path = Path(output_dir)
    signature = json.loads(json.dumps(signature))  # as it reads back from JSON
    if not path.exists() or not any(p.name != LOCK_FILE for p in path.iterdir()):
        return OutputFolder(path, "new")
    record = read_run_file(path)
    if record is None:
        shown = ", ".join(sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)[:6])
        raise UsageError(
            f"--output_dir {path} already holds files that no hf-lorsa run made ({shown}); they are left "
            "untouched. Choose an empty or new folder."
        )
    foreign = sorted(p.name for p in path.iterdir() if not run_made(p))
    if foreign:
        raise UsageError(
            f"--output_dir {path} holds a run and also files that no run made ({', '.join(foreign[:6])}); "
            "move them away or choose another folder."
        )
    if overwrite or (record.get("status") == "starting" and not list(path.glob("checkpoint-*"))):
        clear(path)  # asked to; or a run refused (or stopped) before its first step: nothing of it to keep
        return OutputFolder(path, "new")
    if record["signature"] != signature:
        raise UsageError(
            f"{path} holds a run with a different configuration ({path / RUN_FILE}); choose another "
            "--output_dir, or pass --overwrite_output_dir to start over there."
        )
    if record.get("status") == "finished":
        return OutputFolder(path, "finished", record)
    return OutputFolder(path, "resume", record)


def clear(path: Path) -> None:
    """Remove every file an earlier run made in `path` (checkpoints, results, analysis, card, logs)."""
    for entry in path.iterdir():
        if run_made(entry):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def check_checkpoint(checkpoint: str | Path, signature: dict) -> None:
    """Refuse to resume from a checkpoint of another run (each checkpoint holds its run's signature)."""
    record = read_run_file(checkpoint)
    if record is None or record["signature"] != json.loads(json.dumps(signature)):
        raise UsageError(
            f"The checkpoint {checkpoint} was not made by a run with these options"
            + (" (it records none)" if record is None else "")
            + "; resume it with its own command, or start over with --overwrite_output_dir."
        )


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint written to its end, or None. A checkpoint is complete once its run file is there: the
    run writes it after every other file of the checkpoint (`LorsaTrainer.save_extra_state`). Newer checkpoints
    without one were cut off while being written (a kill, a full disk): they are removed, with a message."""
    found = sorted(
        (int(entry.name.split("-")[1]), entry) for entry in Path(output_dir).glob("checkpoint-*")
        if entry.is_dir() and entry.name.split("-")[1].isdigit()
    )  # fmt: skip
    for _, entry in reversed(found):
        if (entry / RUN_FILE).is_file():
            return str(entry)
        logger.warning("%s was cut off while being written; resuming from the checkpoint before it.", entry)
        shutil.rmtree(entry)
    return None


def remove_checkpoints(path: str | Path) -> None:
    for entry in Path(path).glob("checkpoint-*"):
        if entry.is_dir():
            shutil.rmtree(entry)


def lock(output_dir: str | Path) -> None:
    """Hold `output_dir` for this process until it exits (the folder is made if new): refused while another live
    process holds it; a lock left by a process that no longer runs is taken over, with a message."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    file = path / LOCK_FILE
    while True:
        try:
            descriptor = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(file)
            if holder == os.getpid():
                return
            if holder and _alive(holder):
                raise UsageError(f"--output_dir {path} is in use by another hf-lorsa run (process {holder}); wait for "
                                 "it to end, or choose another --output_dir.") from None  # fmt: skip
            logger.warning("Taking over %s from process %s, which no longer runs.", file, holder)
            file.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        atexit.register(unlock, path)
        return


def unlock(output_dir: str | Path) -> None:
    """Give up the folder's lock, if this process holds it."""
    file = Path(output_dir, LOCK_FILE)
    if _lock_holder(file) == os.getpid():
        file.unlink(missing_ok=True)


def _lock_holder(file: Path) -> int:
    try:
        return int(file.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
