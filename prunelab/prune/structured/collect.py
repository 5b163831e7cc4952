"""Layer scores from one calibration pass of the layer conveyor (``prunelab.prune.walk``).

Each decoder layer runs once over the calibration batches, one layer resident on the device; the
cosine between what it receives and what it returns is summed over every token as it goes, so the
scores need no copy of all hidden states: Block Influence per layer, and the angular distance of
every block of ``block`` consecutive layers (the last ``block`` + 1 layer inputs are kept). Both
average over every calibration token (ShortGPT does; Gromov et al. use the last token only).
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from prunelab.models.adapters import get_adapter
from prunelab.prune.structured.block_influence import cosines
from prunelab.prune.walk import LayerStop, LayerWalk


@torch.no_grad()
def layer_scores(model: nn.Module, calib_ids: torch.Tensor, device: torch.device | str = "cpu", block: int = 1,
                 batch_size: int = 1) -> dict[str, list[float]]:
    """``{"block_influence": [one per layer], "angular_distance": [one per start of a block]}``.

    Block Influence of layer l: 1 − mean cos(x_l, x_{l+1}); angular distance of the block starting
    at l: mean arccos(cos(x_l, x_{l+block})) / π, with x_l the input of layer l.
    """
    adapter = get_adapter(model)
    layers = adapter.num_layers
    if not 1 <= block <= layers:
        raise ValueError(f"a block of {block} layers does not fit in {layers} layers")
    walk = LayerWalk(adapter, torch.device(device))
    was_training = model.training
    model.eval()
    walk.capture(list(calib_ids.split(batch_size)))
    cos_sum = [0.0] * layers
    angle_sum = [0.0] * (layers - block + 1)
    tokens = [0]
    recent: deque[list[torch.Tensor]] = deque(maxlen=block + 1)  # the inputs of the last block + 1 layers

    def visit(stop: LayerStop) -> list[torch.Tensor]:
        if not recent:
            recent.append(stop.inputs)
            tokens[0] = sum(x[..., 0].numel() for x in stop.inputs)
        outputs = walk.forward(stop)
        cos_sum[stop.index] = float(sum(cosines(x, y).sum() for x, y in zip(stop.inputs, outputs)))
        recent.append(outputs)
        start = stop.index + 1 - block
        if start >= 0:
            angle_sum[start] = float(sum((cosines(x, y).clamp(-1, 1).acos() / math.pi).sum()
                                         for x, y in zip(recent[0], outputs)))
        return outputs

    try:
        walk.run(visit, desc="layer scores")
    finally:
        model.train(was_training)
    return {"block_influence": [1.0 - c / tokens[0] for c in cos_sum],
            "angular_distance": [a / tokens[0] for a in angle_sum]}
