"""Record what every decoder layer receives, then replay one layer at a time.

The backbone's decoder-layer list is swapped, for one forward per calibration batch, for
pass-through recorders: each returns its hidden states untouched, so nothing of the layers is
computed, the LM head never runs and no exception stops the forward. The first recorder keeps
the hidden states (the embeddings); every recorder keeps the other arguments its layer gets
(position embeddings, attention masks, position ids, ...), which differ per layer in models
that alternate sliding and full attention (Gemma-3).

Those arguments depend only on the batch's shape: calibration windows carry no padding and the
backbone is called without an attention mask. They are recorded for the first batch of each
shape and shared by the later ones, so the engine keeps one set of masks, not one per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.models.adapters import DecoderAdapter
from prunelab.progress import progress


@dataclass
class LayerCall:
    """Everything but the hidden states that one decoder layer receives in one forward."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """Layer-0 hidden states per batch and every layer's other arguments per batch.

    Attributes:
        hidden: one tensor ``[batch, seqlen, hidden]`` per calibration batch (layer 0's input).
        calls: ``calls[layer][batch]``; batches of one shape share the same :class:`LayerCall`.
    """

    hidden: list[torch.Tensor]
    calls: list[list[LayerCall]] = field(default_factory=list)

    @property
    def num_batches(self) -> int:
        return len(self.hidden)


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Run one decoder layer as the backbone would; returns its output hidden states."""
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _StandIn(nn.Module):
    """Takes decoder layer ``index``'s place in the backbone without computing it."""

    def __init__(self, index: int, layer: nn.Module):
        super().__init__()
        self.index = index
        # A plain attribute (not a submodule): moving the backbone must not move the real layer.
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # A backbone that reads a layer attribute (e.g. ``attention_type``) gets the real one.
            return getattr(object.__getattribute__(self, "_layer"), name)


class _Recorder(_StandIn):
    """Records the layer's arguments, returns the hidden states."""

    def __init__(self, index: int, layer: nn.Module, sink: "_Sink"):
        super().__init__(index, layer)
        object.__setattr__(self, "_sink", sink)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._sink.record(self.index, hidden, rest, kwargs)
        return hidden


class _Replay(_StandIn):
    """Layer 0 returns the given last-layer output; the others hand it on."""

    def __init__(self, index: int, layer: nn.Module, given: list[torch.Tensor | None]):
        super().__init__(index, layer)
        object.__setattr__(self, "_given", given)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.index > 0:
            return hidden
        given = self._given[0]
        if given is None or given.shape != hidden.shape:
            raise RuntimeError("replay: set the batch's last-layer output (of the batch's shape) before the forward")
        return given


class _Sink:
    def __init__(self, num_layers: int):
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[LayerCall]] = [[] for _ in range(num_layers)]
        self._by_shape: dict[tuple[int, ...], list[LayerCall | None]] = {}
        self._shape: tuple[int, ...] = ()
        self._fresh = True

    def start_batch(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._fresh = shape not in self._by_shape
        if self._fresh:
            self._by_shape[shape] = [None] * len(self.calls)

    def record(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if index == 0:
            self.hidden.append(hidden)
        if self._fresh:
            self._by_shape[self._shape][index] = LayerCall(args=args, kwargs=dict(kwargs))

    def end_batch(self) -> None:
        recorded = self._by_shape[self._shape]
        missing = [i for i, call in enumerate(recorded) if call is None]
        if missing:
            raise RuntimeError(f"the backbone did not call decoder layers {missing}; cannot prune them layer by layer")
        for index, call in enumerate(recorded):
            self.calls[index].append(call)


@contextmanager
def replay_outputs(adapter: DecoderAdapter) -> Iterator[Callable[[torch.Tensor], None]]:
    """Let the model's own forward turn last-layer outputs computed elsewhere into logits.

    The decoder layers are swapped for stand-ins for the duration of the block: the first returns
    the hidden states given through the yielded setter, the others pass them on, so the backbone's
    final norm, the LM head and any logit soft-capping run exactly as in a plain forward.
    """
    given: list[torch.Tensor | None] = [None]
    layers = adapter.layers
    _set_path(adapter.backbone, adapter.spec.layers, nn.ModuleList([_Replay(i, layer, given) for i, layer in enumerate(layers)]))
    try:
        yield lambda hidden: given.__setitem__(0, hidden)
    finally:
        _set_path(adapter.backbone, adapter.spec.layers, layers)


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else []:
        parent = getattr(parent, part)
    setattr(parent, attr, value)


def home_device(module: nn.Module) -> torch.device:
    """Where ``module`` keeps its first parameter (or buffer); CPU when it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(
    adapter: DecoderAdapter, batches: Sequence[torch.Tensor], device: torch.device
) -> CapturedInputs:
    """Run the backbone over ``batches`` of token ids with every decoder layer replaced by a recorder.

    The backbone's own modules (embeddings, rotary tables, final norm) are moved to ``device``
    for the capture and back afterwards; the decoder layers stay where they are.
    """
    layers = adapter.layers
    sink = _Sink(len(layers))
    recorders = nn.ModuleList([_Recorder(i, layer, sink) for i, layer in enumerate(layers)])
    _set_path(adapter.backbone, adapter.spec.layers, recorders)
    home = home_device(adapter.backbone)
    try:
        adapter.backbone.to(device)
        for ids in progress(batches, desc="calibration forward (record layer inputs)", unit="batch", leave=False):
            sink.start_batch(tuple(ids.shape))
            adapter.backbone(input_ids=ids.to(device), use_cache=False)
            sink.end_batch()
    finally:
        adapter.backbone.to(home)
        _set_path(adapter.backbone, adapter.spec.layers, layers)
    return CapturedInputs(hidden=sink.hidden, calls=sink.calls)
