"""Where a host's weights live when it does not fit one device: accelerate's big-model loading, as transformers'
`from_pretrained` takes it (`--device_map`, `--max_memory`, `--offload_folder`), checked when the options are read.
"""

from __future__ import annotations

import re

from .usage import UsageError, check_writable_dir, require

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = "spread the host over devices: auto, balanced, sequential, or one device (cpu, cuda:1)"
MAX_MEMORY_HELP = "with --device_map: the most each device holds, e.g. 0=20GiB,cpu=60GiB (the rest goes to disk)"
OFFLOAD_HELP = "with --device_map: the folder for the host's weights that fit no device"


def parse_max_memory(text: str) -> dict:
    """`0=20GiB,cpu=60GiB` as accelerate's `max_memory`: {0: "20GiB", "cpu": "60GiB"}, each size checked."""
    from accelerate.utils import convert_file_size_to_int

    memory = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        require(bool(sep) and re.fullmatch(r"\d+|[a-z]+", key) is not None,
                f"--max_memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB.")  # fmt: skip
        try:
            convert_file_size_to_int(size)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--max_memory {text!r}: {size!r} is not a size (e.g. 500MiB, 20GiB).") from err
        memory[int(key) if key.isdigit() else key] = size
    require(bool(memory), f"--max_memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB.")
    return memory


def placement(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> dict:
    """The keywords `from_pretrained` takes for these options ({} when none is given). --max_memory or
    --offload_folder alone mean --device_map auto."""
    if device_map is None and max_memory is None and offload_folder is None:
        return {}
    kwargs = {"device_map": device_map or "auto"}
    if max_memory is not None:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        check_writable_dir(offload_folder, "offload_folder")
        kwargs["offload_folder"] = offload_folder
    return kwargs


def check_placement(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> None:
    """Refuse, as the options are read, a device map, memory limit or offload folder that cannot work."""
    if device_map is not None:
        require(device_map in STRATEGIES or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?|\d+", device_map) is not None,
                f"--device_map {device_map!r}: give {', '.join(STRATEGIES)}, or one device (cpu, cuda:1).")  # fmt: skip
    placement(device_map, max_memory, offload_folder)
