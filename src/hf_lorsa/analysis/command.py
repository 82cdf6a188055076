"""`hf-lorsa analyze`: the options are read before the analysis loads (datasets, the host), so that `--help` and a
wrong option answer at once."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..base.usage import check_int, command_line
from ..inputs.source_arguments import LorsaSourceArguments
from ..model.files import ANALYSIS_DIR, checked_release_layers, layer_folder


@dataclass
class AnalyzeArguments(LorsaSourceArguments):
    """`hf-lorsa analyze`: how much to keep and where it goes."""

    output: str | None = field(
        default=None, metadata={"help": f"folder to write {ANALYSIS_DIR}/ into (None: the Lorsa's)"}
    )
    top_n: int = field(default=10, metadata={"help": "top contexts kept per head"})
    push_to_hub: str | None = field(default=None, metadata={"help": "also upload the analysis to this Hub repository"})

    def __post_init__(self):
        super().__post_init__()
        check_int("top_n", self.top_n)


def per_layer_arguments(args: AnalyzeArguments) -> list[AnalyzeArguments]:
    """The arguments themselves for one Lorsa; for a release (a folder of layer{L} Lorsas), one copy per layer,
    each writing beside its own Lorsa (or into OUTPUT/layer{L})."""

    layers = checked_release_layers(args.lorsa_dir)
    if not layers:
        return [args]  # one Lorsa (or nothing: the loader says what is missing)
    return [dataclasses.replace(args, subfolder=Path(args.subfolder, layer_folder(layer)).as_posix(),
                                output=str(Path(args.output, layer_folder(layer))) if args.output else None)
            for layer in layers]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`hf-lorsa analyze`: compute the head analysis of a Lorsa (or of every Lorsa of a release) and save it
    beside it."""
    parser = HfArgumentParser(
        AnalyzeArguments, prog="hf-lorsa analyze",
        description="Analyse the heads of a Lorsa. Without --dataset, on its training run's held-out data.",
    )  # fmt: skip
    with command_line("hf-lorsa analyze"):
        (args,) = parser.parse_args_into_dataclasses(argv)
        runs = [(a, a.output_path(str(Path(a.output, ANALYSIS_DIR)) if a.output else None, ANALYSIS_DIR))
                for a in per_layer_arguments(args)]  # fmt: skip
        from ..inputs.loading import open_lorsas
        from ..model.hub import write_card
        from .analysis import analyze, push_analysis, save_analysis  # the heavy part loads once the options are good

        opened, lorsas = open_lorsas(args, [a.subfolder for a, _ in runs], layers_only=True)  # no block above
        for (layer_args, path), lorsa in zip(runs, lorsas):
            result = analyze(opened.host, lorsa, opened.windows, args.max_tokens, args.top_n, args.batch_size,
                             opened.tokenizer, strict=args.strict)  # fmt: skip
            if path.exists():
                shutil.rmtree(path)
            save_analysis(result, path.parent)
            if path.parent.resolve() == layer_args.lorsa_dir.resolve():  # the card beside it says what the probes found
                write_card(lorsa, layer_args.lorsa_dir)
            print(f"Saved the analysis of {len(result)} heads over {json.loads(result.info.description)['n_tokens']} "
                  f"tokens to {path}")  # fmt: skip
            if args.push_to_hub:
                push_analysis(path.parent, args.push_to_hub, layer_args.subfolder)
    return 0
