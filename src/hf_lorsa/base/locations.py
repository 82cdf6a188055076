"""How a name the user gives reads: a local path, or a Hub id (embedded names: `hf_lorsa.embedded`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..embedded import is_embedded


def looks_like_a_path(name: str) -> bool:
    """Written as a local path (./x, /x, ~/x, a/b/c), not as a Hub id (org/name): such a name that does not exist
    is reported as a missing folder or file, never tried on the Hub."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def is_hub_id(name: str | None) -> bool:
    """Could be a Hub repository id (not a path, not an embedded name)."""
    return bool(name) and not looks_like_a_path(name) and not is_embedded(name)


def resolved(name: str | None) -> str | None:
    """A name that is an existing local file or folder as an absolute path (what a Lorsa records must work from
    any folder); a Hub id or an embedded name unchanged."""
    if not isinstance(name, str) or is_embedded(name) or not Path(name).expanduser().exists():
        return name
    return os.path.abspath(Path(name).expanduser())


def resolved_files(spec: str | None) -> str | None:
    """`resolved` for each name of a comma-separated list of dataset files."""
    return spec if not isinstance(spec, str) else ",".join(resolved(part) for part in spec.split(","))


def nearest_existing(path: str | Path) -> Path:
    """`path` as an absolute path if it exists, else the nearest of its parents that does (where a folder that is
    still to be made would be created: what its writability and free space are read from)."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    return existing
