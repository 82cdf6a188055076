"""`hf-lorsa train`: the options are read before the training machinery loads (datasets, the Trainer, the host), so
that `--help` and a wrong option answer at once (`python scripts/bench_startup.py`)."""

from __future__ import annotations

import json
import logging
import sys

from ..base.usage import command_line
from .arguments import parse
from .launch import relaunch_on_cpu


def main(argv: list[str] | None = None) -> int:
    # the processes started for `accelerate launch --cpu --num_processes N` rerun this very command line
    if (code := relaunch_on_cpu(sys.argv[0], sys.argv[1:])) is not None:
        return code
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with command_line("hf-lorsa train"):
        model_args, data_args, args = parse(argv)
        from .run_training import train_layers  # loads once the options are known to be good: start-up, not a circle

        trained = train_layers(model_args, data_args, args)
    for layer, lorsa in trained.items():
        if lorsa.eval_results and args.should_save:
            shown = {k: lorsa.eval_results[k] for k in ("fvu", "l0", "loss_recovered_zero", "kl_spliced")}
            print(json.dumps({"layer": layer, **shown} if model_args.several else shown))
    return 0
