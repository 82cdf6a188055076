"""`hf-lorsa export` and `hf-lorsa push`: their options are read before the Lorsa model and the host load, so that
`--help` and a wrong option answer at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..base.usage import check_int, check_writable_dir, command_line, require


@dataclass
class ExportArguments:
    """`hf-lorsa export`: which Lorsa, its host, and where their format goes."""

    lorsa: str = field(metadata={"help": "Lorsa folder or Hub id (required)"})
    output: str = field(metadata={"help": "folder to write config.json and sae_weights.safetensors into (required)"})
    subfolder: str = field(default="", metadata={"help": "subfolder of the Lorsa repository"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "host model, whose input-norm gain is taken out (None: the recorded one)"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file of the host (None: the recorded one)"})
    n_ctx: int | None = field(default=None, metadata={"help": "their n_ctx (None: the training context length)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier export in --output"})


def export_main(argv: list[str] | None = None) -> int:
    with command_line("hf-lorsa export"):
        parser = HfArgumentParser(ExportArguments, prog="hf-lorsa export",
                                  description="Write a Lorsa in the authors' format (llamascopium).")  # fmt: skip
        (args,) = parser.parse_args_into_dataclasses(argv)
        check_int("n_ctx", args.n_ctx, optional=True)
        # the Lorsa, its format and the host load once the options are read: start-up, not a circle
        from ..inputs.loading import check_gguf_file, open_host
        from ..model.llamascopium import WEIGHTS_FILE
        from ..model.modeling_lorsa import LorsaModel
        from .llamascopium_export import check_export_folder, check_exportable, export_llamascopium

        out = Path(args.output)
        check_writable_dir(out, "output")
        check_export_folder(out, args.overwrite)
        lorsa = LorsaModel.from_pretrained(args.lorsa, subfolder=args.subfolder)
        check_exportable(lorsa.config, args.n_ctx)
        host = None
        if not lorsa.config.input_before_gain:
            name = args.model_name_or_path or lorsa.config.base_model_name_or_path
            require(bool(name), "This Lorsa records no base model; pass --model_name_or_path.")
            gguf = args.gguf_file or (None if args.model_name_or_path else lorsa.config.base_model_gguf_file)
            check_gguf_file(name, gguf)
            host = open_host(name, gguf)
        export_llamascopium(lorsa, out, host, args.n_ctx)
    print(f"Wrote {out / 'config.json'} and {out / WEIGHTS_FILE}: layer {lorsa.config.layer}, "
          f"{lorsa.config.n_ov_heads} OV heads, hook points blocks.{lorsa.config.layer}.ln1.hook_normalized -> "
          f"blocks.{lorsa.config.layer}.hook_attn_out")  # fmt: skip
    return 0


@dataclass
class PushArguments:
    """`hf-lorsa push`: a release folder and the Hub repository it goes to."""

    folder: str = field(metadata={"help": "release folder (the --output_dir of hf-lorsa train --layers) (required)"})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. your-name/lorsa-smollm2 (required)"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to"})
    create_pr: bool = field(default=False, metadata={"help": "open a pull request instead of committing"})
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the host, for a release made from a local host's folder"}
    )


def push_main(argv: list[str] | None = None) -> int:
    with command_line("hf-lorsa push"):
        parser = HfArgumentParser(PushArguments, prog="hf-lorsa push",
                                  description="Upload a release (one Lorsa per layer) to the Hub in one commit.")  # fmt: skip
        (args,) = parser.parse_args_into_dataclasses(argv)
        from .release import push_release  # loads once the options are read: start-up, not a circle

        commit = push_release(args.folder, args.repo_id, args.private or None, None, args.commit_message,
                              args.revision, args.create_pr, args.base_model)  # fmt: skip
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0
