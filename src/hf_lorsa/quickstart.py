"""`hf-lorsa quickstart`: the main job on the package's own host and stories, with nothing downloaded.

It trains a Lorsa on layer 2 of the embedded stories260K Llama with the default recipe (1M tokens, the last 5%
of the stories held out), evaluates it on the held-out stories, and says where it is and what to run next. Any
`hf-lorsa train` option given after it replaces the quickstart's own (`--output_dir`, `--max_tokens`, ...).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .base import parser_snapshot
from .base.usage import command_line
from .embedded import STORIES
from .training.command import COMMAND, OPTION_LIBRARIES, read_options

DEFAULTS = {
    "model_name_or_path": STORIES,
    "dataset": STORIES,
    "layer": "2",
    "holdout_fraction": "0.05",
    "max_tokens": "1000000",
    "eval_tokens": "100000",
    "output_dir": "runs/quickstart",
}
HELP = f"""usage: hf-lorsa quickstart [hf-lorsa train options]

Train a Lorsa on layer 2 of the embedded host {STORIES} (5-layer Llama, d_model 64) with its own stories, evaluate
it on the held-out stories, and print where it is and what to run next. About a minute on a 2-core CPU.
Its options (any hf-lorsa train option replaces one of these or adds to them):
""" + "\n".join(f"  --{name} {value}" for name, value in DEFAULTS.items())


def options(argv: list[str]) -> list[str]:
    return [token for name, value in DEFAULTS.items() for token in (f"--{name}", value)] + list(argv)


def next_steps(output_dir: str, results: dict | None) -> str:
    where = str(Path(output_dir))
    lines = [f"\nA Lorsa of layer 2 of {STORIES} is in {where}/ (weights, config, model card README.md)."]
    if results:
        lines.append(
            f"Held-out stories ({results['n_tokens']} tokens): FVU {results['fvu']:.4f}, "
            f"{results['l0']:.1f} heads active per token, loss recovered {100 * results['loss_recovered_zero']:.1f}% "
            f"(against zero-ablating the layer), {results['dead_heads']} dead heads."
        )
    lines += [
        "Next:",
        f"  hf-lorsa evaluate --lorsa {where} --overwrite --update_card   # splice it in and measure again",
        f"  hf-lorsa analyze --lorsa {where}                              # read every head",
        f"  python spaces/lorsa-inspector/app.py --lorsa {where}          # browse the heads (from a clone)",
        f"  python -c \"import hf_lorsa; print(hf_lorsa.LorsaModel.from_pretrained('{where}').config)\"",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if (code := parser_snapshot.answer(COMMAND, OPTION_LIBRARIES, options(argv))) is not None:
        return code  # an option error, answered as hf-lorsa train answers it
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with command_line("hf-lorsa quickstart"):
        model_args, data_args, args = read_options(options(argv))
        from .training.run_training import train  # loads once the options are known to be good: start-up

        lorsa = train(model_args, data_args, args)
    if args.should_save:
        print(next_steps(args.output_dir, lorsa.eval_results))
        if lorsa.eval_results:
            shown = ("fvu", "l0", "loss_recovered_zero", "kl_spliced", "dead_heads")
            print(json.dumps({k: lorsa.eval_results[k] for k in shown}))
    return 0
