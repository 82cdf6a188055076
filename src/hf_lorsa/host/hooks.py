"""Forward hooks on a host model: capture a layer's attention input/output, or replace it (`hf_lorsa.model.splicing`
splices a Lorsa in with them).

Every hook is removed when the context exits, also after an exception.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..base.usage import is_int
from . import families


@dataclass
class AttentionRecord:
    """One forward pass through the attention of the hooked layer.

    Attributes:
        hidden_states: (B, T, D) the attention input (after the layer's pre-attention norm).
        attention_output: (B, T, D) the attention output before the residual add (None if not reached).
        input_ids: (B, T) the tokens given to the model, or None (inputs_embeds).
        attention_mask: (B, T) padding mask given to the model, or None.
        position_ids: (B, T) position ids the attention received, or None.
        position_embeddings: the host's rotary (cos, sin) for this layer, or None.
    """

    hidden_states: torch.Tensor
    attention_output: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Capture:
    """What `capture` recorded: one AttentionRecord per forward pass, in order."""

    records: list[AttentionRecord] = field(default_factory=list)

    @property
    def last(self) -> AttentionRecord:
        if not self.records:
            raise RuntimeError("Nothing was captured: run the model inside the `with capture(...)` block.")
        return self.records[-1]


class StopForward(Exception):
    """Raised by a hook to end the host's forward pass once the hooked layer is done."""


def _bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


@contextmanager
def hooked(model: nn.Module, layer: int, attention_module: str | None, on_output: Callable) -> Iterator[None]:
    """Track the padding mask at the backbone and call on_output(record, output) after the attention."""
    inner = families.unwrap(model)
    attn = families.get_module(inner, families.attention_path(model, layer, attention_module))
    state: dict = {}

    def backbone_pre_hook(module, args, kwargs):
        bound = _bound_arguments(module, args, kwargs)
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("hf_lorsa hooks need a (batch, positions) padding mask, not a 4-D attention mask.")
        state["mask"], state["input_ids"] = mask, bound.get("input_ids")

    def attention_pre_hook(module, args, kwargs):
        bound = _bound_arguments(module, args, kwargs)
        state["record"] = AttentionRecord(
            hidden_states=bound["hidden_states"] if "hidden_states" in bound else args[0],
            input_ids=state.get("input_ids"),
            attention_mask=state.get("mask"),
            position_ids=bound.get("position_ids"),
            position_embeddings=bound.get("position_embeddings"),
        )

    def attention_hook(module, args, kwargs, output):
        return on_output(state.pop("record"), output)

    with ExitStack() as stack:
        if families.unwrap(model).config.model_type in families.ARCHITECTURES:
            handle = families.backbone(model).register_forward_pre_hook(backbone_pre_hook, with_kwargs=True)
            stack.callback(handle.remove)
        for handle in (
            attn.register_forward_pre_hook(attention_pre_hook, with_kwargs=True),
            attn.register_forward_hook(attention_hook, with_kwargs=True),
        ):
            stack.callback(handle.remove)
        yield


def first_output(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(model: nn.Module, layer: int, attention_module: str | None = None, stop: bool = False) -> Iterator[Capture]:
    """Record layer `layer`'s attention input, output, mask and positions for each forward pass inside.

    With `stop=True` the forward pass ends right after the layer's attention (the rest of the model is
    never computed) and so does the `with` block: code after that model call inside it does not run.
    `attention_module` is a dotted path such as "model.layers.{layer}.self_attn" for architectures
    hf_lorsa does not know.
    """
    _check_layer_argument(layer)
    result = Capture()

    def on_output(record: AttentionRecord, output):
        record.hidden_states = record.hidden_states.detach()
        record.attention_output = first_output(output).detach()
        result.records.append(record)
        if stop:
            raise StopForward

    with hooked(model, layer, attention_module, on_output):
        try:
            yield result
        except StopForward:
            pass  # the block ends with the first (stopped) forward pass


def _check_layer_argument(layer) -> None:
    if not is_int(layer):
        raise TypeError(f"layer must be an integer (the index of a decoder layer), got {layer!r}.")


def collect(model: nn.Module, layer: int, **inputs) -> AttentionRecord:
    """Run the host up to layer `layer`'s attention (never beyond) and return what it saw and wrote.

    Tensor inputs are moved to the host's input device first.
    """
    device = families.input_device(model)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad(), capture(model, layer, stop=True) as cap:
        model(**inputs, use_cache=False)
    return cap.last


def collect_layers(model: nn.Module, layers: list[int], **inputs) -> dict[int, AttentionRecord]:
    """`collect` for several layers in one forward pass, which stops after the deepest one's attention."""
    for layer in layers:
        _check_layer_argument(layer)
    device = families.input_device(model)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad(), ExitStack() as stack:
        captures = {layer: stack.enter_context(capture(model, layer, stop=layer == max(layers))) for layer in layers}
        model(**inputs, use_cache=False)
    return {layer: captures[layer].last for layer in layers}


@torch.no_grad()
def collect_to_cpu(model: nn.Module, layer: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """`collect` for a batch of token windows, returned as CPU copies (`input_ids`, `hidden_states`,
    `attention_output`) ready to store; `collect` itself returns the tensors where the host made them."""
    record = collect(model, layer, input_ids=input_ids)
    return {
        "input_ids": input_ids.cpu(),
        "hidden_states": record.hidden_states.cpu(),
        "attention_output": record.attention_output.cpu(),
    }


# ---- one host pass, several versions of one attention output (evaluation) -----------------------------


def _repeat(value, batch: int, copies: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat(v, batch, copies) for v in value)
    return value


@contextmanager
def _repeated_from_layer(model: nn.Module, layer: int, batch: int, copies: int) -> Iterator[None]:
    """From decoder layer `layer` on, every batch-sized input is repeated `copies` times along the batch."""

    def pre_hook(module, args, kwargs):
        return _repeat(args, batch, copies), {k: _repeat(v, batch, copies) for k, v in kwargs.items()}

    layers = families.decoder_layers(model)
    handles = [layers[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_variants(model: nn.Module, layer: int, input_ids: torch.Tensor, copies: int,
                 variants: Callable[[AttentionRecord, torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:  # fmt: skip
    """Logits (copies, B, T, V) of `copies` versions of one forward pass that differ only in layer `layer`'s
    attention output: the layers below run once, then the batch is repeated, copy i continuing with
    `variants(record, y)[i]`, where `record` is what the attention saw and `y` (B, T, D) what it wrote."""
    ids = input_ids.to(families.input_device(model))
    B = ids.shape[0]

    def on_output(record: AttentionRecord, output):
        versions = variants(first_copy(record, B), first_output(output)[:B])
        if len(versions) != copies:
            raise ValueError(f"variants gave {len(versions)} outputs, not {copies}.")
        new = torch.cat(versions)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with hooked(model, layer, None, on_output), _repeated_from_layer(model, layer, B, copies):
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (copies * B, T, V)
    return logits.view(copies, B, *logits.shape[1:])


def first_copy(record: AttentionRecord, batch: int) -> AttentionRecord:
    """The record of the first `batch` rows of a batch repeated from an earlier layer on."""

    def head(t):
        return t[:batch] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] > batch else t

    embeddings = record.position_embeddings
    return AttentionRecord(
        hidden_states=head(record.hidden_states), input_ids=head(record.input_ids),
        attention_mask=head(record.attention_mask), position_ids=head(record.position_ids),
        position_embeddings=None if embeddings is None else tuple(head(t) for t in embeddings),
    )  # fmt: skip


@torch.no_grad()
def run_replaced(model: nn.Module, replace: dict[int, Callable[[AttentionRecord, torch.Tensor], torch.Tensor]],
                 input_ids: torch.Tensor, copies: int) -> torch.Tensor:  # fmt: skip
    """Logits (copies, B, T, V) of one forward pass whose batch is repeated `copies` times from the shallowest
    layer of `replace` on. At each of those layers, `replace[layer](record, y)` returns the attention output of
    all copies (copies * B, T, D), from what the attention saw (`record`, all copies) and wrote (`y`)."""
    ids = input_ids.to(families.input_device(model))
    B = ids.shape[0]

    def hook(fn):
        def on_output(record: AttentionRecord, output):
            new = fn(record, first_output(output))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return on_output

    with ExitStack() as stack:
        for layer, fn in replace.items():
            stack.enter_context(hooked(model, layer, None, hook(fn)))
        stack.enter_context(_repeated_from_layer(model, min(replace), B, copies))
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return logits.view(copies, B, *logits.shape[1:])
