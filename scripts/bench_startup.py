"""How long the command line takes to answer before any work: `hf-lorsa --version`, `--help`, each command's `--help`,
and an option error (BENCHMARKS.md, "Start-up").

    python scripts/bench_startup.py [--repeats 5]

Each command runs in a fresh process, `--repeats` times; prints one JSON line per command with the median and the
fastest wall time in seconds. `train --help` is timed twice: as every call after the first makes it (the parser's
snapshot written, `hf_lorsa.base.parser_snapshot`), and as the first call makes it (an empty snapshot folder each
time: "no snapshot"). Run it on a quiet machine: another process on the cores slows every start.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = [
    ["--version"],
    ["--help"],
    ["train", "--help"],
    ["train", "--no_such_option", "1"],
    ["evaluate", "--help"],
    ["analyze", "--help"],
    ["export", "--help"],
    ["push", "--help"],
    ["quickstart", "--help"],
]


def main(argv: list[str]) -> int:
    repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 5
    program = shutil.which("hf-lorsa") or sys.exit("hf-lorsa is not on the PATH: pip install -e . first")
    subprocess.run([program, "train", "--help"], capture_output=True)  # the snapshot, for the calls after the first
    for command, fresh in [(c, False) for c in COMMANDS] + [(["train", "--help"], True)]:
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as empty:
                env = {**os.environ, "HF_LORSA_CACHE": empty} if fresh else None
                start = time.perf_counter()
                done = subprocess.run([program, *command], capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - start)
        name = "hf-lorsa " + " ".join(command) + (" (no snapshot)" if fresh else "")
        print(json.dumps({"command": name, "exit_code": done.returncode,
                          "median_s": round(statistics.median(times), 2), "fastest_s": round(min(times), 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
