"""The options that name a Lorsa, its host and its text (`hf-lorsa evaluate`, `analyze`, the Space): checked when they
are read, before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base.locations import looks_like_a_path, resolved, resolved_files
from ..base.placement import DEVICE_MAP_HELP, MAX_MEMORY_HELP, OFFLOAD_HELP, check_placement, placement
from ..base.usage import DTYPES, UsageError, check_int, check_model_name, check_writable_dir, require


@dataclass
class LorsaSourceArguments:
    """Which Lorsa, which host, which text."""

    lorsa: str = field(metadata={"help": "Lorsa folder or Hub id (required)"})
    subfolder: str = field(default="", metadata={"help": "subfolder of the Lorsa repository (one layer of a release)"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "host model (None: the Lorsa's recorded base model)"}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file of the host in --model_name_or_path (None: the recorded one)"}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Hub dataset or local .jsonl/.txt/.parquet files (None: the training run's held-out data)"},
    )
    text_column: str | None = field(default=None, metadata={"help": "text column (None: the run's, else 'text')"})
    split: str | None = field(default=None, metadata={"help": "split of a Hub dataset (None: the run's)"})
    holdout_fraction: float | None = field(
        default=None, metadata={"help": "use the last fraction of local documents (None: the run's)"}
    )
    context_length: int | None = field(default=None, metadata={"help": "tokens per window (None: the run's, else 256)"})
    max_tokens: int = field(default=200_000, metadata={"help": "token budget"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    torch_dtype: str = field(default="float32", metadata={"help": "host dtype: float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (None: cuda when available)"})
    device_map: str | None = field(default=None, metadata={"help": DEVICE_MAP_HELP})
    max_memory: str | None = field(default=None, metadata={"help": MAX_MEMORY_HELP})
    offload_folder: str | None = field(default=None, metadata={"help": OFFLOAD_HELP})
    strict: bool = field(
        default=True, metadata={"help": "refuse a host other than the one the Lorsa was made from (--no_strict)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace earlier results at the output"})

    def __post_init__(self):
        require(isinstance(self.lorsa, str) and self.lorsa.strip() != "", "--lorsa is required.")
        local = Path(self.lorsa).expanduser()
        require(local.exists() or not looks_like_a_path(self.lorsa), f"--lorsa {self.lorsa}: no such folder.")
        if self.model_name_or_path is not None:
            check_model_name(self.model_name_or_path)
        self.model_name_or_path, self.dataset = resolved(self.model_name_or_path), resolved_files(self.dataset)
        if self.holdout_fraction is not None:
            ok = isinstance(self.holdout_fraction, (int, float)) and 0 <= self.holdout_fraction < 1
            require(ok, f"--holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}.")
        check_int("context_length", self.context_length, optional=True)
        check_int("max_tokens", self.max_tokens)
        check_int("batch_size", self.batch_size)
        require(self.torch_dtype in DTYPES[1:], f"--torch_dtype must be one of {DTYPES[1:]}, got {self.torch_dtype!r}.")
        check_placement(self.device_map, self.max_memory, self.offload_folder)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise UsageError(f"--device {self.device!r} is not a device (cpu, cuda, cuda:1, ...).") from err
        if device.type == "cuda":
            require(
                torch.cuda.is_available(), f"--device {self.device}: this machine has no CUDA GPU; use --device cpu."
            )
            require(device.index is None or device.index < torch.cuda.device_count(),
                    f"--device {self.device}: this machine has {torch.cuda.device_count()} GPUs.")  # fmt: skip

    @property
    def placement(self) -> dict:
        """`from_pretrained`'s keywords for --device_map, --max_memory and --offload_folder ({} without them)."""
        return placement(self.device_map, self.max_memory, self.offload_folder)

    @property
    def lorsa_dir(self) -> Path:
        return Path(self.lorsa, self.subfolder)

    def output_path(self, output: str | None, default_name: str) -> Path:
        """Where results go: `output`, else beside a local Lorsa; refused when it would replace earlier
        results without --overwrite. Checked before anything is loaded."""
        if output is None:
            require(
                self.lorsa_dir.is_dir(),
                f"--lorsa {self.lorsa}: there is no such local folder (as a Hub id, its results need --output FILE).",
            )
            path = self.lorsa_dir / default_name
        else:
            path = Path(output)
        check_writable_dir(path.parent, "output")
        require(
            self.overwrite or not path.exists(),
            f"{path} already exists (earlier results); pass --overwrite to replace it, or --output elsewhere.",
        )
        return path
