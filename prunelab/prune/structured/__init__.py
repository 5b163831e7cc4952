"""Importance scores of structured units (attention heads, MLP neurons, decoder layers).

Pure tensor math, one small file per score, like ``prune/methods``: each takes the weights (and the
statistics or gradients it needs) of one layer and returns one score per unit, higher = more
important. Removing the units is ``prunelab.models.surgery``'s job.

A head's or neuron's *channels* are the input columns of the layer's output projection that it
feeds: neuron i is column i of ``down_proj``; query head h is columns ``h*d .. (h+1)*d - 1`` of
``o_proj``. :func:`units.per_unit` sums channel scores into unit scores.
"""
