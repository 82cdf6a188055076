"""Freed memory stays in the process: tensors allocated and freed over and over fault no fresh pages in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_lorsa.kernels import freed_memory
from hf_lorsa.kernels.freed_memory import keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")

PROBE = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("freed_memory", sys.argv[2])  # alone: no torch or transformers to import
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kept = module.keep_freed_memory() if sys.argv[1] == "keep" else False

def step():  # a train step's temporaries: blocks of tens of MiB from malloc, each written, then freed
    for mib in (24, 40, 24, 56, 12, 40):
        b"1" * (mib << 20)

step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, **env: str) -> dict:
    """Page faults of five steps after two, in a fresh process: `mode` keep (keep_freed_memory first) or not."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode, freed_memory.__file__],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults_unless_the_user_chose():
    # the user's own threshold: glibc read it at start, nothing is changed, and it maps each tensor above 128 KiB
    # afresh: 5 steps x 196 MiB = 250K pages of 4 KiB
    users = probe("keep", MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    assert not users["kept"] and users["faults"] > 100_000
    kept = probe("keep")
    assert kept["kept"] and kept["faults"] < users["faults"] / 50  # at most a few MiB as the heap settles


@pytest.mark.parametrize("keep_bytes", [0, -1, 2**31])
def test_a_size_malloc_cannot_take_is_refused(keep_bytes):
    with pytest.raises(ValueError, match="keep_bytes must be in"):
        keep_freed_memory(keep_bytes)
