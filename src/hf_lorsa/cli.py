"""`hf-lorsa`: one command line for training, evaluating and analysing Lorsas."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "hf_lorsa.run_training:main",
    "evaluate": "hf_lorsa.evaluation:main",
    "analyze": "hf_lorsa.analysis:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: hf-lorsa {{{','.join(COMMANDS)}}} [options]   (hf-lorsa COMMAND --help for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, function = COMMANDS[argv[0]].split(":")
    from importlib import import_module

    return getattr(import_module(module_name), function)(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
