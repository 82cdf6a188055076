"""Several CPU processes from `accelerate launch --cpu --num_processes N`.

accelerate 1.x starts multi-process CPU runs only through MPI; without it, `--cpu --num_processes N`
starts a single process (with MASTER_ADDR set, since N > 1). In that case the script starts its N
processes itself with torch.distributed.run (gloo), which the Trainer then uses like any DDP run.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys


def requested_cpu_processes() -> int | None:
    """N when this process was started by `accelerate launch --cpu --num_processes N` (N > 1) without MPI."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_ADDR" not in env or "RANK" in env:
        return None
    import psutil

    cmd = psutil.Process().parent().cmdline()
    for i, arg in enumerate(cmd):
        if arg == "--num_processes" and i + 1 < len(cmd):
            return int(cmd[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    return None


def relaunch_on_cpu(script: str, argv: list[str]) -> int | None:
    """Run `script argv` in N gloo processes when asked for them; None when this process should just train."""
    n = requested_cpu_processes()
    if not n or n < 2:
        return None
    env = dict(os.environ)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
        f"--master_addr={env['MASTER_ADDR']}", f"--master_port={env.get('MASTER_PORT', '29500')}",
        script, *argv, "--use_cpu=true",
    ]  # fmt: skip
    return subprocess.run(cmd, env=env).returncode


def release_process_group_at_exit() -> None:
    """Destroy the default process group (if any) before the interpreter shuts down.

    A process that exits with its gloo group still alive may abort (SIGABRT) while the interpreter finalises:
    gloo's worker threads still hold tensors, and freeing them then needs a GIL that is gone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        atexit.unregister(_destroy_process_group)  # once, however many runs this process trains
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
