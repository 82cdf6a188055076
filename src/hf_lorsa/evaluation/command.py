"""`hf-lorsa evaluate`: one Lorsa (`evaluation`), or every layer of a release and their whole replacement
(`replacement`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..base.usage import command_line
from ..inputs.source_arguments import LorsaSourceArguments
from ..model.files import EVAL_RESULTS_FILE, checked_release_layers


@dataclass
class EvaluateArguments(LorsaSourceArguments):
    """`hf-lorsa evaluate`: where the results go."""

    output: str | None = field(default=None, metadata={"help": f"results file (None: LORSA/{EVAL_RESULTS_FILE})"})
    update_card: bool = field(default=False, metadata={"help": "write the results into the model card"})


def parser() -> HfArgumentParser:
    return HfArgumentParser(
        EvaluateArguments, prog="hf-lorsa evaluate",
        description="Evaluate a Lorsa spliced into its model. Without --dataset, on its training run's held-out data.",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    with command_line("hf-lorsa evaluate"):
        (args,) = parser().parse_args_into_dataclasses(argv)
        from ..inputs.loading import open_lorsa_source  # the heavy part loads once the options are good: start-up
        from .evaluation import evaluate_lorsa, save_results, update_card
        from .replacement import release_command

        layers = checked_release_layers(args.lorsa_dir)
        if layers:  # a release: every layer, and the whole replacement
            print(json.dumps(release_command(args, layers), indent=2))
            return 0
        output = args.output_path(args.output, EVAL_RESULTS_FILE)
        opened = open_lorsa_source(args)
        lorsa = opened.lorsa
        results = evaluate_lorsa(
            opened.host, lorsa, opened.windows, args.max_tokens, args.batch_size, strict=args.strict
        ).to_dict()
    results.update(**opened.source.describe(), model=args.model_name_or_path or lorsa.config.base_model_name_or_path,
                   lorsa=args.lorsa, subfolder=args.subfolder or None, layer=lorsa.config.layer)  # fmt: skip
    save_results(results, output)
    if args.update_card:
        update_card(lorsa, results, args.lorsa, args.subfolder)
    print(json.dumps(results, indent=2))
    return 0
