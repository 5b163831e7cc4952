"""The layer conveyor: decoder layers visited in order, one at a time on the compute device.

:meth:`LayerWalk.capture` records what every decoder layer receives: layer 0's hidden states and
each layer's other arguments (masks, position embeddings), from one backbone forward per
calibration batch with the layers replaced by recorders (``prunelab.prune.capture``).
:meth:`LayerWalk.run` then visits the layers in order. For layer i it

1. moves the layer to ``device``;
2. calls the visitor with a :class:`LayerStop` (the layer, its inputs per batch, its recorded
   call arguments per batch); the visitor runs the layer as often as it needs with
   :meth:`LayerWalk.forward`, optionally observing its modules' inputs with hooks (an observer,
   e.g. ``prunelab.prune.stats.StatsCollector``, is told when each batch ends);
3. moves the layer back to where it was (also when the visitor raises);
4. hands whatever the visitor returned to layer i + 1 as its inputs.

A walk over a model bigger than memory has a *residence* (``prunelab.models.streaming.StreamedLayers``):
it reads layer i's weights from disk before step 1 and puts the layer back on the meta device
after step 3; a walk that leaves each layer in its final state (``run(final=True)``: the pruning
walk, not a pre-pass) has it written out first, unless the visitor raised.

A walk without :meth:`~LayerWalk.capture` (methods that need no statistics) still visits every
layer on the device, with ``inputs`` None. When :meth:`~LayerWalk.forward`'s outputs are not kept,
the layer's last Linear (``ArchSpec.last_linear``, e.g. ``mlp.down_proj``) returns zeros of its
output shape instead of its product, which would only reach the discarded output; its forward
pre-hooks still see its input. ``forwards`` counts layer passes over the whole calibration set.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from prunelab.models.adapters import DecoderAdapter, PrunableModule
from prunelab.progress import progress
from prunelab.prune.capture import CapturedInputs, LayerCall, capture_layer_inputs, home_device, run_layer
from prunelab.prune.timing import PhaseTimer


class BatchObserver(Protocol):
    """Watches a layer's forward passes (through hooks of its own); told when each batch ends."""

    def end_batch(self) -> None: ...


@dataclass
class LayerStop:
    """One decoder layer on the compute device, with what the walk carries into it.

    Attributes:
        index: the layer's position in the decoder stack.
        layer: the decoder layer, on the walk's device for the duration of the visit.
        inputs: its input hidden states, one tensor per calibration batch; None when the walk
            carries no calibration data.
        calls: its other arguments per batch (``prunelab.prune.capture.LayerCall``); None likewise.
        last: True for the last decoder layer, whose outputs nothing reads.
    """

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor] | None
    calls: list[LayerCall] | None
    last: bool


Visitor = Callable[[LayerStop], list[torch.Tensor] | None]


class Residence(Protocol):
    """Where decoder layers live between visits when the model is not in memory."""

    def load(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module, write: bool) -> None: ...


@contextmanager
def _input_only(module: PrunableModule | None) -> Iterator[None]:
    """Make ``module`` return zeros of its output shape (its pre-hooks still see the input)."""
    if module is None:
        yield
        return
    out_features = module.out_features

    def forward(_self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    module.module.forward = types.MethodType(forward, module.module)
    try:
        yield
    finally:
        del module.module.forward


class LayerWalk:
    """Moves decoder layers one at a time to ``device`` and runs them over the calibration batches.

    Args:
        adapter: the model's decoder-layer view (``prunelab.models.adapters.get_adapter``).
        device: where one layer is computed.
        timer: when given, layer moves are timed under ``move`` (and reads and writes of a streamed
            layer under ``stream``); callers time their own forwards.
        residence: where layers live between visits; None: in the model, in memory.
    """

    def __init__(self, adapter: DecoderAdapter, device: torch.device, timer: PhaseTimer | None = None,
                 residence: Residence | None = None):
        self.adapter = adapter
        self.device = device
        self.timer = timer
        self.residence = residence
        self.forwards = 0
        self._captured: CapturedInputs | None = None
        self._spent = False  # a run took the captured inputs over

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def capture(self, batches: Sequence[torch.Tensor]) -> None:
        """Record layer 0's inputs and every layer's call arguments for these batches of token ids."""
        self._captured = capture_layer_inputs(self.adapter, batches, self.device)
        self._spent = False

    def run(self, visit: Visitor, desc: str, keep_inputs: bool = False, final: bool = False) -> list[torch.Tensor] | None:
        """Visit every layer in order (see the module docstring); return the last visit's result.

        Args:
            visit: called once per layer with its :class:`LayerStop`; returns the next layer's inputs.
            desc: the progress bar's label.
            keep_inputs: leave the captured layer-0 inputs for a later run (a pre-pass); otherwise
                this run takes them over and each layer's inputs are freed once the next has its own.
            final: the visits leave each layer as it will stay (a residence writes it out).
        """
        inputs, calls = self._take(keep_inputs)
        for index in progress(range(self.num_layers), desc=desc, unit="layer"):
            stop = LayerStop(
                index=index,
                layer=self.adapter.layers[index],
                inputs=inputs,
                calls=calls[index] if calls is not None else None,
                last=index == self.num_layers - 1,
            )
            with self._on_device(index, stop.layer, final):
                inputs = visit(stop)
            del stop
        return inputs

    def forward(
        self, stop: LayerStop, observer: BatchObserver | None = None, keep_outputs: bool = True
    ) -> list[torch.Tensor]:
        """Run ``stop``'s layer over every calibration batch; its outputs per batch ([] when not kept)."""
        if stop.inputs is None or stop.calls is None:
            raise RuntimeError("this walk carries no calibration data; call capture() before forward()")
        outputs = []
        with _input_only(None if keep_outputs else self._last_linear(stop)):
            for batch, call in zip(stop.inputs, stop.calls):
                out = run_layer(stop.layer, batch, call)
                if keep_outputs:
                    outputs.append(out)
                if observer is not None:
                    observer.end_batch()
        self.forwards += 1
        return outputs

    def _take(self, keep_inputs: bool) -> tuple[list[torch.Tensor] | None, list[list[LayerCall]] | None]:
        """The captured layer-0 inputs and per-layer calls (None, None without a capture)."""
        if self._spent:
            raise RuntimeError("the captured inputs were taken over by an earlier run; capture again")
        if self._captured is None:
            return None, None
        inputs, calls = self._captured.hidden, self._captured.calls
        if not keep_inputs:
            self._captured, self._spent = None, True
        return inputs, calls

    def _timed(self, key: str) -> AbstractContextManager[None]:
        return self.timer(key) if self.timer is not None else nullcontext()

    @contextmanager
    def _on_device(self, index: int, layer: nn.Module, final: bool) -> Iterator[None]:
        if self.residence is not None:
            with self._timed("stream"):
                self.residence.load(index, layer)
        home = home_device(layer)
        done = False
        try:
            with self._timed("move"):
                layer.to(self.device)
            yield
            done = True
        finally:
            with self._timed("move"):
                layer.to(home)
            if self.residence is not None:
                with self._timed("stream"):
                    self.residence.release(index, layer, write=final and done)

    def _last_linear(self, stop: LayerStop) -> PrunableModule | None:
        name = self.adapter.spec.last_linear
        if name is None:
            return None
        try:
            module = stop.layer.get_submodule(name)
        except AttributeError:
            return None
        return PrunableModule(stop.index, name, f"{self.adapter.layers_path}.{stop.index}.{name}", module)
