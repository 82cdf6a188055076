"""A Lorsa on disk and on the Hub: strict loading (safetensors only, every tensor and config key), the files written
beside the weights (eval_results.json, the model card of `model_card`), pushing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import HTTPError

from ..base.locations import looks_like_a_path
from ..base.writing import write_atomically
from .configuration_lorsa import LorsaConfig
from .files import EVAL_RESULTS_FILE, location, release_layers
from .llamascopium import is_llamascopium_config, lorsa_config_dict
from .model_card import model_card, publishable_base

REQUIRED_CONFIG_KEYS = ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k")


def check_lorsa_config(name_or_path, kwargs: dict) -> dict | None:
    """The config.json of a Lorsa as a dict, after refusing with a clear message a folder that holds another
    kind of model or an incomplete config (None when `kwargs` bring their own config)."""
    subfolder = kwargs.get("subfolder") or ""
    where = location(name_or_path, subfolder)
    if kwargs.get("config") is not None:
        return None
    local = Path(str(name_or_path)).expanduser()
    if local.is_dir() and not (local / subfolder / "config.json").is_file():
        layers = release_layers(local / subfolder)
        if layers:
            raise OSError(f"{where} is a release of layers {layers}: pass subfolder='layer{layers[0]}' "
                          f"(--subfolder layer{layers[0]}) for one of them.")  # fmt: skip
        raise OSError(f"Could not load a Lorsa from {where}: it needs config.json and model.safetensors.")
    if not local.exists() and looks_like_a_path(str(name_or_path)):
        raise OSError(f"Could not load a Lorsa from {where}: no such folder (it needs config.json and "
                      "model.safetensors).")  # fmt: skip
    try:
        config, _ = LorsaConfig.get_config_dict(
            str(name_or_path), subfolder=subfolder, revision=kwargs.get("revision"), token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"), local_files_only=kwargs.get("local_files_only", False),
        )  # fmt: skip
    except (OSError, json.JSONDecodeError) as err:
        if not local.exists():  # neither a local folder nor a Hub repository that could be read
            raise OSError(f"Could not load a Lorsa from {where}: there is no such local folder, and as a Hub id it "
                          f"could not be read ({str(err).splitlines()[0][:200]})") from err  # fmt: skip
        raise OSError(f"Could not read the config.json of a Lorsa at {where}: {err}") from err
    if is_llamascopium_config(config):  # the authors' format: its config read as ours (the weights come later)
        return {"model_type": "lorsa", **lorsa_config_dict(config, layer=kwargs.get("layer"), where=where)}
    model_type = config.get("model_type")
    if model_type != "lorsa":
        raise ValueError(
            f"{where} holds a {model_type!r} model, not a Lorsa (its config.json says model_type={model_type!r}). "
            "Load it with transformers' AutoModelForCausalLM; a Lorsa folder is written by hf-lorsa train or "
            "LorsaModel.save_pretrained."
        )
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"The config.json of the Lorsa at {where} lacks {missing}; the checkpoint is incomplete.")
    return config


# may be absent: BatchTopK Lorsas saved before heads had their own thresholds hold every head at the shared one
MAY_BE_MISSING = {"threshold_scale"}


def check_loading_info(name_or_path, info: dict) -> None:
    """Every weight must come from the checkpoint: a missing or misshapen tensor is refused, not made up."""
    problems = {
        "missing": sorted(set(info.get("missing_keys") or []) - MAY_BE_MISSING),
        "unexpected": sorted(info.get("unexpected_keys") or []),
        "of the wrong shape": sorted(_mismatch(k) for k in info.get("mismatched_keys") or []),
    }  # fmt: skip
    found = {kind: keys for kind, keys in problems.items() if keys}
    if found:
        listed = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in found.items())
        raise ValueError(f"The weights of the Lorsa at {name_or_path} do not match its config ({listed}).")


def _mismatch(entry) -> str:
    """'name (file: (8, 16), config: (16, 16))' from transformers' (name, file shape, model shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, stored, expected = entry
        return f"{name} (the file holds {tuple(stored)}, its config.json asks for {tuple(expected)})"
    return str(entry[0] if isinstance(entry, tuple) else entry)


def check_finite(lorsa, where: str) -> None:
    """A weight with NaN or infinite entries is refused at load, naming it (a damaged or diverged checkpoint)."""
    bad = [name for name, t in lorsa.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"The Lorsa at {where} has NaN or infinite values in {', '.join(bad)}: the checkpoint is "
                         "damaged or comes from a run that diverged; train it again or load another.")  # fmt: skip


def saved_mechanisms(directory: str | Path) -> dict | None:
    """What the probes found, from an analysis saved beside the Lorsa (`hf-lorsa analyze`), or None."""
    meta = Path(directory, "analysis", "meta.json")
    try:
        return json.loads(meta.read_text()).get("mechanisms") if meta.is_file() else None
    except (OSError, ValueError):
        return None


def write_card(lorsa, directory: str | Path, repo_id: str | None = None, subfolder: str = "") -> None:
    """Write eval_results.json (the model's own results; a stale file of another model is removed) and the
    README.md card into `directory`."""
    results_file = Path(directory, EVAL_RESULTS_FILE)
    if lorsa.eval_results:
        write_atomically(results_file, json.dumps(lorsa.eval_results, indent=2))
    elif results_file.exists():
        results_file.unlink()
    hint = None if repo_id else os.path.abspath(directory)  # the snippet loads it from any folder
    card = model_card(lorsa.config, lorsa.eval_results, repo_id, subfolder, repo_hint=hint,
                      mechanisms=saved_mechanisms(directory))  # fmt: skip
    card.save(Path(directory, "README.md"))


def usual_file_modes(directory: str | Path) -> None:
    """Give the files directly in `directory` the mode a new file gets under the process's umask (0644 usually)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(directory).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


@contextmanager
def uploading(repo_id: str) -> Iterator[None]:
    """A failed upload (no network, a bad token, no rights to the repository) ends with what failed and that no
    commit was made, not a connection error's traceback."""
    try:
        yield
    except HTTPError as err:
        reason = str(err).splitlines()[0][:300] or type(err).__name__
        raise OSError(f"Uploading to the Hub repository {repo_id} failed ({reason}); no commit was made. Check the "
                      "network and your token (hf auth login, or HF_TOKEN), then run it again.") from err  # fmt: skip


def push(lorsa, repo_id, subfolder, commit_message, private, token, revision, create_pr, base_model=None):
    """Save into a temporary folder laid out like the repository and upload it with transformers' mixin. A Lorsa of
    a local host needs `base_model`, its Hub id (refused before anything is uploaded)."""
    import copy
    import tempfile

    base = publishable_base(lorsa.config, base_model)
    if base != lorsa.config.base_model_name_or_path:
        lorsa = copy.deepcopy(lorsa)
        lorsa.config.base_model_name_or_path = base

    from transformers.utils.hub import hf_api

    with uploading(repo_id), tempfile.TemporaryDirectory() as tmp:
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        target = Path(tmp, subfolder) if subfolder else Path(tmp)
        target.mkdir(parents=True, exist_ok=True)
        lorsa.save_pretrained(target)
        write_card(lorsa, target, repo_id, subfolder or "")
        return lorsa._upload_modified_files(
            tmp, repo_id, files_timestamps={}, commit_message=commit_message or "Upload Lorsa",
            token=token, create_pr=create_pr, revision=revision,
        )  # fmt: skip


def load_safetensors_only(load, name_or_path, *args, **kwargs):
    """Call transformers' from_pretrained with safetensors forced, turning its failures into clear errors."""
    from safetensors import SafetensorError

    if kwargs.get("use_safetensors") is False:
        raise ValueError("hf_lorsa loads safetensors checkpoints only; pickle checkpoints are never loaded.")
    kwargs["use_safetensors"] = True
    # a tensor whose size disagrees with config.json is reported by `check_loading_info`, naming it and both sizes
    # (transformers would raise, suggesting ignore_mismatched_sizes: the wrong fix for a Lorsa)
    kwargs.setdefault("ignore_mismatched_sizes", True)
    where = location(name_or_path, kwargs.get("subfolder"))
    try:
        return load(name_or_path, *args, **kwargs)
    except SafetensorError as err:
        raise ValueError(
            f"The safetensors file of the Lorsa at {where} is corrupted ({err}); download it again."
        ) from err
    except OSError as err:
        raise OSError(
            f"Could not load a Lorsa from {where}: it needs config.json and model.safetensors. hf_lorsa never "
            f"loads pickle checkpoints (pytorch_model.bin); re-save such weights with safetensors. ({err})"
        ) from err


def own_allocations(model) -> None:
    """Give each parameter and buffer that starts off a 64-byte boundary (a view into the loaded file's buffer) an
    allocation of its own. MKL's products differ in their last bits with their operands' alignment, so without this
    a loaded Lorsa's outputs would not be bitwise those of the Lorsa that was saved (tests/test_hub.py)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
