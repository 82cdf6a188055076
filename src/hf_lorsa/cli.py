"""`hf-lorsa`: one command line for training, evaluating and analysing Lorsas."""

from __future__ import annotations

import sys

COMMANDS = {
    "quickstart": (
        "hf_lorsa.quickstart:main",
        "train and evaluate a Lorsa on the embedded stories260K host, nothing downloaded (about a minute)",
    ),
    "train": (
        "hf_lorsa.training.command:main",
        "train a Lorsa on one attention layer of a causal LM (or one per layer: --layers)",
    ),
    "evaluate": (
        "hf_lorsa.evaluation.command:main",
        "splice a Lorsa into its model: FVU, L0, dead heads, loss recovered",
    ),
    "analyze": (
        "hf_lorsa.analysis.command:main",
        "read every head: top contexts, z-patterns, logit attribution, tags",
    ),
    "export": ("hf_lorsa.formats.commands:export_main", "write a Lorsa in the authors' format (llamascopium)"),
    "push": ("hf_lorsa.formats.commands:push_main", "upload a release (one Lorsa per layer) to the Hub in one commit"),
}


def usage() -> str:
    lines = ["usage: hf-lorsa COMMAND [options]   (hf-lorsa COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<12}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "  --version  print the version of hf_lorsa"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from importlib.metadata import version

        print(f"hf-lorsa {version('hf_lorsa')}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(), file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"\nhf-lorsa: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if asked else 2
    module_name, function = COMMANDS[argv[0]][0].split(":")
    from importlib import import_module

    return getattr(import_module(module_name), function)(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
