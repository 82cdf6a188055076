"""Several CPU processes from `accelerate launch --cpu --num_processes N`, on one machine or several.

accelerate 1.x starts multi-process CPU runs only through MPI; without it, `--cpu --num_processes N
[--num_machines M --machine_rank R]` starts a single process per machine (with MASTER_ADDR set). In that case
the script starts its machine's N / M processes itself with torch.distributed.run (gloo, the machines meeting
at MASTER_ADDR:MASTER_PORT), which the Trainer then uses like any DDP run.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys


def requested_cpu_processes() -> tuple[int, int, int] | None:
    """(N processes in all, M machines, this machine's rank) when this process was started by `accelerate launch
    --cpu --num_processes N [--num_machines M --machine_rank R]` (N > 1, or M > 1) without MPI: read from the
    launcher's command line, or from its --config_file."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_ADDR" not in env or "RANK" in env:
        return None
    import psutil

    launched = launcher_arguments(psutil.Process().parent().cmdline())
    if launched is None:
        return None
    processes, machines = launched.num_processes or 1, launched.num_machines or 1
    if processes < 2 and machines < 2:
        return None
    return max(processes, machines), machines, launched.machine_rank or 0


def launcher_arguments(cmd: list[str]):
    """The options of the `accelerate launch` command line `cmd`, read by accelerate's own parser, with those its
    --config_file sets and the command line does not; None when `cmd` is not such a launcher."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    starts = [i + 1 for i, arg in enumerate(cmd) if arg in ("launch", "accelerate.commands.launch")]
    if not starts:
        return None
    args = launch_command_parser().parse_args(cmd[starts[0] :])
    if args.config_file:
        config = load_config_from_file(args.config_file)
        for name in ("num_processes", "num_machines", "machine_rank"):
            if getattr(args, name) is None:
                setattr(args, name, getattr(config, name, None))
    return args


def relaunch_on_cpu(script: str, argv: list[str]) -> int | None:
    """Run `script argv` in this machine's share of the gloo processes when asked for them (`torch.distributed.run`,
    its machines meeting at MASTER_ADDR:MASTER_PORT); None when this process should just train."""
    requested = requested_cpu_processes()
    if requested is None:
        return None
    processes, machines, rank = requested
    env = dict(os.environ)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={machines}", f"--node_rank={rank}",
        f"--nproc_per_node={processes // machines}", f"--master_addr={env['MASTER_ADDR']}",
        f"--master_port={env.get('MASTER_PORT', '29500')}", script, *argv, "--use_cpu=true",
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
