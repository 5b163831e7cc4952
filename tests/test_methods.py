"""Pruning methods against independent computations: naive sorts, a naive OBS loop, closed forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.prune.masks import nm_violations, sparsity_of
from prunelab.prune.methods import METHODS, build_method
from prunelab.prune.methods.base import HESSIAN, SQ_NORM, InputStats
from prunelab.prune.pattern import Pattern

CONF = Path(__file__).resolve().parents[1] / "prunelab" / "conf" / "method"
UNSTRUCTURED = Pattern()


def correlated_inputs(tokens: int, width: int, rank: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (low rank plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=gen) @ torch.randn(rank, width, generator=gen) + 0.05 * torch.randn(
        tokens, width, generator=gen
    )


def stats_for(x: torch.Tensor, needs: frozenset[str]) -> InputStats:
    stats = InputStats(x.shape[1], needs)
    stats.add(x)
    return stats


# ---------------------------------------------------------------- registry and configs


def test_every_method_config_builds_its_method():
    names = set()
    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.name == "dense":
            continue
        method = build_method(cfg.name, cfg.params)
        assert type(method) is METHODS[cfg.name]
        names.add(cfg.name)
    assert names == {"magnitude", "wanda", "sparsegpt", "random"}


def test_build_method_errors_list_what_is_known():
    with pytest.raises(ValueError, match="magnitude, random, sparsegpt, wanda"):
        build_method("obs", {})
    with pytest.raises(ValueError, match="blocksize.*percdamp"):
        build_method("sparsegpt", {"block_size": 64})
    with pytest.raises(ValueError, match="scope"):
        build_method("magnitude", {"scope": "model"})
    with pytest.raises(ValueError, match="percdamp"):
        build_method("sparsegpt", {"percdamp": -1.0})
    with pytest.raises(ValueError, match="dense"):
        build_method("dense", {})


# ---------------------------------------------------------------- magnitude, wanda, random


def test_magnitude_is_a_whole_matrix_threshold():
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    result = build_method("magnitude", {}).prune(weight, None, 0.45, UNSTRUCTURED)
    flat = weight.abs().flatten().tolist()
    k = int(len(flat) * 0.45)
    expected = set(sorted(range(len(flat)), key=lambda i: flat[i])[:k])
    assert {i for i, keep in enumerate(result.mask.flatten().tolist()) if not keep} == expected
    assert torch.equal(result.weight, weight * result.mask)


@pytest.mark.parametrize("shape,sparsity", [((4, 12), 0.5), ((7, 20), 0.6), ((3, 9), 0.34)])
def test_wanda_matches_a_naive_per_row_sort(shape, sparsity):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(shape, generator=gen)
    x = torch.randn(50, in_features, generator=gen) * torch.rand(in_features, generator=gen) * 3
    norms = [sum(row[j] ** 2 for row in x.tolist()) ** 0.5 for j in range(in_features)]
    result = build_method("wanda", {}).prune(weight, stats_for(x, frozenset({SQ_NORM})), sparsity, UNSTRUCTURED)
    k = int(in_features * sparsity)
    for r, row in enumerate(weight.tolist()):
        score = [abs(w) * n for w, n in zip(row, norms)]
        expected = set(sorted(range(in_features), key=lambda j: score[j])[:k])
        assert {j for j in range(in_features) if not result.mask[r, j]} == expected
    assert torch.equal(result.weight, weight * result.mask)


def test_wanda_nm_compares_within_groups_and_differs_from_magnitude():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 16, generator=gen)
    x = torch.randn(40, 16, generator=gen) * torch.linspace(0.1, 5.0, 16)
    p = Pattern.parse("2:4")
    result = build_method("wanda", {}).prune(weight, stats_for(x, frozenset({SQ_NORM})), 0.5, p)
    norms = x.pow(2).sum(0).sqrt().tolist()
    for r, row in enumerate(weight.tolist()):
        for start in range(0, 16, 4):
            score = {j: abs(row[j]) * norms[j] for j in range(start, start + 4)}
            expected = set(sorted(score, key=score.get)[:2])
            assert {j for j in range(start, start + 4) if not result.mask[r, j]} == expected
    assert nm_violations(result.weight, p) == 0
    magnitude = build_method("magnitude", {}).prune(weight, None, 0.5, p)
    assert not torch.equal(magnitude.mask, result.mask)  # the input norms changed the choice


def test_wanda_without_statistics_says_what_is_missing():
    with pytest.raises(ValueError, match="sq_norm"):
        build_method("wanda", {}).prune(torch.randn(2, 4), None, 0.5, UNSTRUCTURED)


def test_random_is_reproducible_per_seed_with_exact_counts():
    weight = torch.randn(16, 32)
    a, b, c = (build_method("random", {"seed": s}) for s in (3, 3, 4))
    first_a, second_a = a.prune(weight, None, 0.3, UNSTRUCTURED), a.prune(weight, None, 0.3, UNSTRUCTURED)
    first_b, second_b = b.prune(weight, None, 0.3, UNSTRUCTURED), b.prune(weight, None, 0.3, UNSTRUCTURED)
    assert torch.equal(first_a.mask, first_b.mask) and torch.equal(second_a.mask, second_b.mask)
    assert not torch.equal(first_a.mask, second_a.mask)  # same-shaped modules get different masks
    assert not torch.equal(first_a.mask, c.prune(weight, None, 0.3, UNSTRUCTURED).mask)
    assert int((~first_a.mask).sum()) == int(16 * 32 * 0.3)
    assert nm_violations(c.prune(weight, None, 0.5, Pattern(2, 4)).weight, Pattern(2, 4)) == 0


# ---------------------------------------------------------------- SparseGPT


def reference_sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float = 0.0, chunk: int = 0, percdamp=0.01
):
    """Naive SparseGPT in float64: no Cholesky, no lazy batches, explicit inverses of trailing blocks.

    At column j the not-yet-visited columns F = j.. are repaired with OBS restricted to F:
    δw_F = −w_j/[H_FF⁻¹]_00 · H_FF⁻¹[:, 0]. The saliency of column j is w_j²/[H_jj..⁻¹]_00.
    Unstructured masks are chosen every ``chunk`` columns with an equal count per chunk.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    n_in = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(n_in, dtype=torch.float64)
    inverses = [torch.linalg.inv(H[j:, j:]) for j in range(n_in)]
    saliency_scale = [inv[0, 0].item() for inv in inverses]
    pruned = [[False] * n_in for _ in range(W.shape[0])]
    for j in range(n_in):
        rows = W.tolist()
        if pattern.is_nm and j % pattern.m == 0:
            for r, row in enumerate(rows):
                sal = {c: row[c] ** 2 / saliency_scale[c] for c in range(j, j + pattern.m)}
                for c in sorted(sal, key=sal.get)[: pattern.n]:
                    pruned[r][c] = True
        elif not pattern.is_nm and j % chunk == 0:
            cells = [(r, c) for r in range(len(rows)) for c in range(j, min(j + chunk, n_in))]
            sal = {(r, c): rows[r][c] ** 2 / saliency_scale[c] for r, c in cells}
            for r, c in sorted(sal, key=sal.get)[: int(len(cells) * sparsity)]:
                pruned[r][c] = True
        inv = inverses[j]
        for r in range(W.shape[0]):
            if pruned[r][j]:
                W[r, j:] -= W[r, j] / inv[0, 0] * inv[:, 0]
    return W, ~torch.tensor(pruned)


@pytest.mark.parametrize("pattern,blocksize", [("2:4", 4), ("2:4", 64), ("4:8", 8), ("1:4", 12)])
def test_sparsegpt_nm_matches_naive_obs_loop(pattern, blocksize):
    p = Pattern.parse(pattern)
    x = correlated_inputs(96, 24, rank=6, seed=1)
    weight = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    stats = stats_for(x, frozenset({HESSIAN}))
    result = build_method("sparsegpt", {"blocksize": blocksize}).prune(weight, stats, 0.5, p)
    expected_w, expected_mask = reference_sparsegpt(weight, stats.hessian, p)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight.double(), expected_w, rtol=1e-4, atol=1e-4)
    assert nm_violations(result.weight, p) == 0


@pytest.mark.parametrize("blocksize,mask_blocksize", [(8, None), (16, 8), (4, 8)])
def test_sparsegpt_unstructured_matches_naive_obs_loop(blocksize, mask_blocksize):
    x = correlated_inputs(96, 32, rank=8, seed=3)
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    stats = stats_for(x, frozenset({HESSIAN}))
    params = {"blocksize": blocksize, "mask_blocksize": mask_blocksize}
    result = build_method("sparsegpt", params).prune(weight, stats, 0.5, UNSTRUCTURED)
    expected_w, expected_mask = reference_sparsegpt(
        weight, stats.hessian, UNSTRUCTURED, 0.5, chunk=mask_blocksize or blocksize
    )
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight.double(), expected_w, rtol=1e-4, atol=1e-4)


def test_inverse_hessian_factor_in_place_equals_the_out_of_place_chain():
    """The in-place factorisation gives, bit for bit, Cholesky → inverse → upper Cholesky of the damped H."""
    from prunelab.prune.methods.sparsegpt import inverse_hessian_factor

    x = correlated_inputs(300, 40, rank=40, seed=11)
    hessian = stats_for(x, frozenset({HESSIAN})).hessian
    hessian[:, 7] = hessian[7, :] = 0.0  # a dead input
    damped = hessian.clone()
    diag = torch.diagonal(damped)
    diag[diag == 0] = 1.0
    diag += 0.01 * diag.mean()
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    original = hessian.clone()

    upper, dead = inverse_hessian_factor(hessian, 0.01)
    assert torch.equal(upper, expected) and torch.equal(hessian, original), "the caller's H must stay as it was"
    assert dead.tolist() == [j == 7 for j in range(40)]
    torch.testing.assert_close(upper.double().t() @ upper.double(), torch.linalg.inv(damped.double()), rtol=1e-4, atol=1e-6)

    upper_in_place, _ = inverse_hessian_factor(hessian, 0.01, overwrite=True)
    assert torch.equal(upper_in_place, expected)
    assert upper_in_place.data_ptr() == hessian.data_ptr(), "overwrite=True factors in H's own storage"


def test_sparsegpt_reuses_the_hessian_only_when_the_engine_says_it_is_disposable():
    x = correlated_inputs(96, 32, rank=8, seed=3)
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    method = build_method("sparsegpt", {"blocksize": 8})
    kept = stats_for(x, frozenset({HESSIAN}))
    original = kept.hessian.clone()
    first = method.prune(weight, kept, 0.5, UNSTRUCTURED)
    assert torch.equal(kept.hessian, original), "a shared Hessian (q/k/v) must reach the next module intact"
    disposable = stats_for(x, frozenset({HESSIAN}))
    disposable.disposable = True
    storage = disposable.hessian
    second = method.prune(weight, disposable, 0.5, UNSTRUCTURED)
    assert disposable.hessian is None and not torch.equal(storage, original), "its storage now holds the factor"
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)


@pytest.mark.parametrize("q,blocksize", [(0, 128), (3, 128), (3, 2)])
def test_sparsegpt_single_weight_update_is_the_obs_closed_form(q, blocksize):
    """One row, one pruned weight: δw = −w_q/[H⁻¹]_qq · H⁻¹[:, q] over the columns not yet visited."""
    n_in, percdamp = 8, 0.01
    x = correlated_inputs(64, n_in, rank=4, seed=6)
    gen = torch.Generator().manual_seed(7)
    weight = (torch.rand(1, n_in, generator=gen) + 0.5) * torch.sign(torch.randn(1, n_in, generator=gen))
    weight[0, q] = 1e-3  # the one weight that must go
    stats = stats_for(x, frozenset({HESSIAN}))
    # one mask over the whole row (mask_blocksize=8) so the single pruned weight is w_q
    method = build_method("sparsegpt", {"blocksize": blocksize, "percdamp": percdamp, "mask_blocksize": n_in})
    result = method.prune(weight, stats, 1 / n_in, UNSTRUCTURED)
    assert (~result.mask).nonzero().tolist() == [[0, q]]

    H = x.double().T @ x.double()
    H += percdamp * torch.diagonal(H).mean() * torch.eye(n_in, dtype=torch.float64)
    w = weight[0].double()
    expected = w.clone()
    if q == 0:  # nothing visited yet: the full OBS update
        hinv = torch.linalg.inv(H)
        expected -= w[q] / hinv[q, q] * hinv[:, q]
    else:  # columns before q are frozen: OBS on the trailing block
        hinv = torch.linalg.inv(H[q:, q:])
        expected[q:] -= w[q] / hinv[0, 0] * hinv[:, 0]
    assert abs(expected[q].item()) < 1e-12
    torch.testing.assert_close(result.weight[0].double(), expected, rtol=1e-4, atol=1e-5)
    assert result.weight[0, q] == 0


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.norm(x @ weight.T - x @ pruned.T).item()


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern, sparsity):
    p = Pattern.parse(pattern)
    x = correlated_inputs(512, 64, rank=12, seed=8)
    layer = torch.nn.Linear(64, 32, bias=False)
    torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(9))
    weight = layer.weight.detach()
    stats = stats_for(x, frozenset({SQ_NORM, HESSIAN}))
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt", "random"):
        result = build_method(name, {}).prune(weight, stats, sparsity, p)
        assert sparsity_of(result.mask) == pytest.approx(sparsity, abs=1 / 64)
        errors[name] = reconstruction_error(weight, result.weight, x)
    # measured here: 0.5 -> 195 vs 909/943, 0.7 -> 1005 vs 1423/1575, 2:4 -> 511 vs 1239/1260
    assert errors["sparsegpt"] < 0.8 * min(errors["wanda"], errors["magnitude"]), errors
    assert max(errors["wanda"], errors["magnitude"]) < errors["random"], errors


@pytest.mark.parametrize("shape,sparsity", [((7, 24), 0.5), ((5, 40), 0.33), ((3, 130), 0.6)])
def test_sparsegpt_prunes_exact_counts(shape, sparsity):
    out_features, in_features = shape
    x = correlated_inputs(64, in_features, rank=5, seed=in_features)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    result = build_method("sparsegpt", {"blocksize": 16}).prune(
        weight, stats_for(x, frozenset({HESSIAN})), sparsity, UNSTRUCTURED
    )
    assert int((~result.mask).sum()) == int(out_features * in_features * sparsity)
    assert torch.all(result.weight[~result.mask] == 0)
    assert torch.count_nonzero(result.weight) == int(result.mask.sum())  # survivors are non-zero here


def test_sparsegpt_dead_inputs_are_zeroed_and_stay_finite():
    x = correlated_inputs(128, 16, rank=6, seed=10)
    x[:, [2, 9]] = 0.0  # two inputs never fire during calibration
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(11))
    stats = stats_for(x, frozenset({HESSIAN}))
    assert stats.hessian[2, 2] == 0 and stats.hessian[9, 9] == 0
    result = build_method("sparsegpt", {}).prune(weight, stats, 0.5, UNSTRUCTURED)
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[:, [2, 9]] == 0)
    assert int((~result.mask).sum()) == 32
    expected_w, expected_mask = reference_sparsegpt(weight, stats.hessian, UNSTRUCTURED, 0.5, chunk=128)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight.double(), expected_w, rtol=1e-4, atol=1e-4)
    assert torch.equal(stats.hessian[2], torch.zeros(16))  # the caller's statistics are not modified


def test_sparsegpt_keeps_dtype_and_rejects_bad_setups():
    x = correlated_inputs(64, 16, rank=4, seed=12)
    stats = stats_for(x, frozenset({HESSIAN}))
    weight = torch.randn(4, 16).to(torch.bfloat16)
    result = build_method("sparsegpt", {}).prune(weight, stats, 0.5, UNSTRUCTURED)
    assert result.weight.dtype == torch.bfloat16 and result.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="multiple of M=8"):
        build_method("sparsegpt", {"blocksize": 12}).prune(weight, stats, 0.5, Pattern(4, 8))
    with pytest.raises(ValueError, match="in_features=16"):
        build_method("sparsegpt", {}).prune(torch.randn(4, 16), stats, 0.5, Pattern(1, 3))
    with pytest.raises(ValueError, match="mask_blocksize"):
        build_method("sparsegpt", {"blocksize": 8, "mask_blocksize": 6}).prune(weight, stats, 0.5, UNSTRUCTURED)
    with pytest.raises(ValueError, match="hessian"):
        build_method("sparsegpt", {}).prune(weight, None, 0.5, UNSTRUCTURED)
    with pytest.raises(ValueError, match="another module"):
        build_method("sparsegpt", {}).prune(torch.randn(4, 8), stats, 0.5, UNSTRUCTURED)


def test_sparsegpt_outlier_scores_read_norms_off_the_hessian():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(13))
    weight = torch.randn(3, 6)
    scores = build_method("sparsegpt", {}).outlier_scores(weight, stats_for(x, frozenset({HESSIAN})))
    norms = torch.tensor([sum(v * v for v in col) ** 0.5 for col in x.T.tolist()])
    torch.testing.assert_close(scores, weight.abs() * norms, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparsegpt_runs_on_the_tensors_device():
    x = correlated_inputs(64, 32, rank=6, seed=14)
    weight = torch.randn(8, 32)
    stats = stats_for(x, frozenset({HESSIAN}))
    cpu = build_method("sparsegpt", {"blocksize": 8}).prune(weight, stats, 0.5, Pattern(2, 4))
    stats.hessian = stats.hessian.cuda()
    gpu = build_method("sparsegpt", {"blocksize": 8}).prune(weight.cuda(), stats, 0.5, Pattern(2, 4))
    assert gpu.weight.device.type == "cuda" and gpu.mask.device.type == "cuda"
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-4)
