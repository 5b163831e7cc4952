"""OWL's pre-pass shared across jobs: read back only for the same weights, windows, method and reduction."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab.prune import engine
from prunelab.prune.engine import prune_model
from prunelab.prune.methods import build_method
from tiny_models import BUILDERS, random_ids

CPU = {"device": "cpu"}
OWL = {"name": "owl", "lam": 0.08, "m": 2.0}


def _owl(model, ids, cache, method="wanda", allocation=OWL, sparsity=0.5):
    return prune_model(model, build_method(method), ids, sparsity, "unstructured", allocation, CPU, cache_dir=cache)


@pytest.fixture
def walks(monkeypatch):
    """Counts the engine's pre-pass walks (the work the cache saves)."""
    count = {"n": 0}
    real = engine.LayerwisePruner._score_walk

    def counted(self, *args, **kwargs):
        count["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine.LayerwisePruner, "_score_walk", counted)
    return count


def test_a_second_job_reads_the_ratios_back_and_prunes_exactly_alike(tmp_path, walks):
    dense = BUILDERS["llama"]()
    ids = random_ids(nsamples=2, seqlen=16)
    uncached = _owl(copy.deepcopy(dense), ids, None)
    first_model, second_model = copy.deepcopy(dense), copy.deepcopy(dense)
    first = _owl(first_model, ids, tmp_path)
    second = _owl(second_model, ids, tmp_path, sparsity=0.6)  # another sparsity: the same pre-pass
    assert walks["n"] == 2  # the uncached job and the first cached one; the second read the file
    assert first.prepass_cache["hit"] is False and second.prepass_cache["hit"] is True
    assert first.prepass_cache["key"] == second.prepass_cache["key"]
    assert first.outlier_ratios == uncached.outlier_ratios == second.outlier_ratios
    assert first.layer_targets == uncached.layer_targets
    third = copy.deepcopy(dense)
    _owl(third, ids, tmp_path)
    for a, b in zip(first_model.parameters(), third.parameters()):
        assert torch.equal(a, b)  # a job that read the cache prunes exactly like one that computed it


@pytest.mark.parametrize("change", ["weights", "windows", "method", "m"])
def test_anything_the_pass_reads_changes_the_key(tmp_path, walks, change):
    dense = BUILDERS["llama"]()
    ids = random_ids(nsamples=2, seqlen=16)
    base = _owl(copy.deepcopy(dense), ids, tmp_path)
    model, method, allocation = copy.deepcopy(dense), "wanda", OWL
    if change == "weights":  # as after a pruning step or a fine-tuning: not the dense model any more
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    elif change == "windows":
        ids = ids.flip(1)
    elif change == "method":
        method = "sparsegpt"
    else:
        allocation = dict(OWL, m=3.0)
    other = _owl(model, ids, tmp_path, method=method, allocation=allocation)
    assert other.prepass_cache["hit"] is False and other.prepass_cache["key"] != base.prepass_cache["key"]
    assert walks["n"] == 2


def test_a_damaged_or_foreign_file_is_recomputed(tmp_path, walks):
    dense = BUILDERS["llama"]()
    ids = random_ids(nsamples=2, seqlen=16)
    first = _owl(copy.deepcopy(dense), ids, tmp_path)
    path = tmp_path / "prepass" / f"{first.prepass_cache['key']}.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(dict(stored, values=stored["values"][:-1])))  # one layer short
    again = _owl(copy.deepcopy(dense), ids, tmp_path)
    assert again.prepass_cache["hit"] is False and again.outlier_ratios == first.outlier_ratios
    path.write_text("{not json")
    assert _owl(copy.deepcopy(dense), ids, tmp_path).prepass_cache["hit"] is False
    assert walks["n"] == 3
    assert _owl(copy.deepcopy(dense), ids, tmp_path).prepass_cache["hit"] is True  # rewritten whole


def test_no_cache_without_owl_or_without_a_folder(tmp_path):
    dense = BUILDERS["llama"]()
    ids = random_ids(nsamples=2, seqlen=16)
    assert _owl(copy.deepcopy(dense), ids, tmp_path, allocation={"name": "uniform"}).prepass_cache is None
    assert _owl(copy.deepcopy(dense), ids, None).prepass_cache is None
    assert not (tmp_path / "prepass").exists()
