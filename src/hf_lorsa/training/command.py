"""`hf-lorsa train`: the options are read before the training machinery loads (datasets, the Trainer, the host), and
`--help` or an option argparse refuses is answered from the parser's snapshot (`base.parser_snapshot`) before the
options' own classes load (transformers' TrainingArguments), so that both answer at once
(`python scripts/bench_startup.py`)."""

from __future__ import annotations

import json
import logging
import sys

from ..base import parser_snapshot
from ..base.usage import command_line
from .launch import relaunch_on_cpu

COMMAND = "hf-lorsa train"
OPTION_LIBRARIES = ("transformers",)  # whose classes define options (TrainingArguments)


def read_options(argv: list[str]) -> tuple:
    """The options' dataclasses, read by the real parser; its snapshot is written for the next start if none is."""
    from .arguments import parse, parser  # start-up: the options' classes load once the snapshot cannot answer

    if parser_snapshot.load(COMMAND, OPTION_LIBRARIES) is None:
        parser_snapshot.save(COMMAND, OPTION_LIBRARIES, lambda show_all: parser(show_all=show_all))
    return parse(argv)


def main(argv: list[str] | None = None) -> int:
    # the processes started for `accelerate launch --cpu --num_processes N` rerun this very command line
    if (code := relaunch_on_cpu(sys.argv[0], sys.argv[1:])) is not None:
        return code
    argv = sys.argv[1:] if argv is None else argv
    options_file = bool(argv) and argv[0].endswith((".yaml", ".yml", ".json"))
    if not options_file and (code := parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, argv)) is not None:
        return code
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with command_line(COMMAND):
        model_args, data_args, args = read_options(argv)
        from .run_training import train_layers  # loads once the options are known to be good: start-up, not a circle

        trained = train_layers(model_args, data_args, args)
    for layer, lorsa in trained.items():
        if lorsa.eval_results and args.should_save:
            shown = {k: lorsa.eval_results[k] for k in ("fvu", "l0", "loss_recovered_zero", "kl_spliced")}
            print(json.dumps({"layer": layer, **shown} if model_args.several else shown))
    return 0
