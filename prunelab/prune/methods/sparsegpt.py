"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let OBS fix the rest.

With H = XᵀX the layer's input Hessian (up to scale), removing weight q of a row and moving the
others by δw = −w_q/[H⁻¹]_qq · H⁻¹[:, q] is the least-squares optimal repair (Optimal Brain
Surgeon). SparseGPT visits columns left to right and only repairs the columns not yet visited,
so the inverse it needs at column i is that of H restricted to columns i.. — row i of the upper
Cholesky factor U of H⁻¹ holds it: [H_{i:,i:}⁻¹][0, :] = U_ii · U[i, i:]. Updates inside a block
of ``blocksize`` columns are applied at once; the block's errors reach later columns in one
matmul ("lazy batch updates").
"""

from __future__ import annotations


import torch

from prunelab.device import is_aligned
from prunelab.prune.masks import check_nm_width, check_sparsity, freeze_scores, prune_count
from prunelab.prune.methods.base import HESSIAN, InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern



def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"method.params.{key}={value!r} must be a positive integer")
    return value


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepare H: returns (upper Cholesky factor of (H + damp·I)⁻¹, mask of dead inputs).

    Dead inputs (H_ii == 0, never active during calibration) get H_ii = 1 so H stays invertible;
    the caller zeroes their weights. ``damp = percdamp · mean(diag H)``.

    The three factorisations (Cholesky, inverse from the factor, Cholesky of the inverse) run in
    place in one [in, in] buffer: a copy of ``hessian``, or ``hessian`` itself when ``overwrite``
    and it is float32 already (its owner no longer needs it). LAPACK works on column-major
    matrices, so the buffer is handed over as its transpose, which is the same matrix for the
    symmetric H and for the symmetric inverse; with a row-major ``out`` torch would factor into a
    temporary and copy back (485 MB more at in=11008). The result is bit for bit the one of the
    out-of-place calls, with their column-major strides, on every CPU: ``hessian`` is overwritten
    only when it is contiguous and 64-byte aligned like the copy would be (a tensor viewed from a
    safetensors file is copied), since MKL's factorisations round differently on unaligned memory.
    """
    # The in-place path only on a buffer laid out like the copy (contiguous, 64-byte aligned): MKL
    # may factor an unaligned matrix by another code path, which rounds differently.
    if not (overwrite and hessian.dtype == torch.float32 and is_aligned(hessian)):
        hessian = hessian.to(torch.float32).clone(memory_format=torch.contiguous_format)
    work = hessian.mT  # column-major view of the symmetric matrix
    diag = torch.diagonal(work)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    try:
        torch.linalg.cholesky(work, out=work)
        torch.cholesky_inverse(work, out=work)
        torch.linalg.cholesky(work, upper=True, out=work)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"sparsegpt: the damped Hessian is not positive definite with percdamp={percdamp}; "
            "raise method.params.percdamp (e.g. 0.1) or calibrate on more tokens"
        ) from err
    return work, dead


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_blocksize: int | None = None,
    frozen: torch.Tensor | None = None,
    overwrite_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] with OBS reconstruction; returns (pruned weight, keep-mask).

    Works on the weight's device in float32 and returns the weight in its own dtype.

    Args:
        weight: the Linear's weight ``[out, in]``.
        hessian: Σ x xᵀ over calibration tokens ``[in, in]`` (any positive scale).
        sparsity: fraction to prune for unstructured patterns; exactly floor(out·in·s) entries
            (dead inputs' zeros count among them when they are selected). Ignored for N:M.
        pattern: unstructured, or N:M (the N lowest of each group chosen when the loop reaches it).
        blocksize: columns per lazy batch update; a multiple of M for N:M.
        percdamp: damping added to diag H, as a fraction of its mean.
        mask_blocksize: unstructured only: columns whose mask is chosen together, using the
            weights as updated so far (None = ``blocksize``). It must divide ``blocksize`` or be a
            multiple of it; ``in_features`` chooses one mask for the whole matrix up front.
        frozen: entries pruned by an earlier step (True): selected first in their column block or
            N:M group and always pruned, so the OBS update compensates for them like for any pruned
            weight and never leaves one non-zero.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)} but the weight has in_features={in_features}; "
            "the statistics were collected for another module"
        )
    mask_blocksize = blocksize if mask_blocksize is None else mask_blocksize
    if pattern.is_nm:
        check_nm_width(in_features, pattern)
        if blocksize % pattern.m != 0:
            raise ValueError(f"sparsegpt: blocksize={blocksize} must be a multiple of M={pattern.m} for pattern={pattern}")
    else:
        sparsity = check_sparsity(sparsity)
        if blocksize % mask_blocksize != 0 and mask_blocksize % blocksize != 0:
            raise ValueError(
                f"sparsegpt: mask_blocksize={mask_blocksize} must divide blocksize={blocksize} or be a multiple of it"
            )

    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    hinv, dead = inverse_hessian_factor(hessian.to(device), percdamp, overwrite=overwrite_hessian)
    W[:, dead] = 0.0
    hinv_diag = torch.diagonal(hinv)
    pruned = torch.zeros_like(W, dtype=torch.bool)  # True = removed
    if frozen is not None:
        if frozen.shape != W.shape:
            raise ValueError(f"frozen mask has shape {tuple(frozen.shape)}, the weight {tuple(W.shape)}")
        frozen = frozen.to(device, torch.bool)
    numel_per_col = out_features

    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        W1 = W[:, i1:i2].clone()
        Hinv1 = hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if pattern.is_nm and col % pattern.m == 0:
                group = W1[:, i : i + pattern.m] ** 2 / hinv_diag[col : col + pattern.m].unsqueeze(0) ** 2
                if frozen is not None:
                    group = freeze_scores(group, frozen[:, col : col + pattern.m])
                drop = torch.topk(group, pattern.n, dim=1, largest=False).indices + col
                pruned.scatter_(1, drop, True)
                if frozen is not None:
                    pruned[:, col : col + pattern.m] |= frozen[:, col : col + pattern.m]
            elif not pattern.is_nm and col % mask_blocksize == 0:
                end = min(col + mask_blocksize, in_features)
                # At a block start W is fully updated; inside a block the chunk ends within W1.
                current = W[:, col:end] if i == 0 else W1[:, i : i + end - col]
                scores = current**2 / hinv_diag[col:end].unsqueeze(0) ** 2
                if frozen is not None:
                    scores = freeze_scores(scores, frozen[:, col:end])
                # Split the matrix-wide count over chunks so the total is exactly floor(numel·s).
                k = prune_count(numel_per_col * end, sparsity) - prune_count(numel_per_col * col, sparsity)
                if k > 0:
                    drop = torch.topk(scores.reshape(-1), k, largest=False).indices
                    chunk = torch.zeros(scores.numel(), dtype=torch.bool, device=device)
                    chunk[drop] = True
                    pruned[:, col:end] = chunk.view_as(scores)
                if frozen is not None:
                    pruned[:, col:end] |= frozen[:, col:end]
            w = W1[:, i]
            q = w.masked_fill(pruned[:, col], 0.0)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    keep = ~pruned
    W.masked_fill_(pruned, 0.0)
    return W.to(weight.dtype), keep


class SparseGPTPruning(PruningMethod):
    """SparseGPT with the paper's defaults (blocksize 128, 1% damping)."""

    name = "sparsegpt"
    needs = frozenset({HESSIAN})

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, mask_blocksize: int | None = None):
        _positive_int(blocksize, "blocksize")
        if mask_blocksize is not None:
            _positive_int(mask_blocksize, "mask_blocksize")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
            raise ValueError(f"method.params.percdamp={percdamp!r} must be a number >= 0 (the paper uses 0.01)")
        super().__init__(blocksize=blocksize, percdamp=float(percdamp), mask_blocksize=mask_blocksize)
        self.blocksize = blocksize
        self.percdamp = float(percdamp)
        self.mask_blocksize = mask_blocksize

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              frozen: torch.Tensor | None = None) -> PruneResult:
        if stats is None or stats.hessian is None:
            raise ValueError("sparsegpt needs input statistics with a hessian; the engine must collect HESSIAN for it")
        new_weight, mask = sparsegpt_prune(
            weight, stats.hessian, sparsity, pattern, self.blocksize, self.percdamp, self.mask_blocksize, frozen,
            overwrite_hessian=stats.disposable,
        )
        if stats.disposable:
            stats.hessian = None  # factored in place: no longer X Xᵀ
        return PruneResult(weight=new_weight, mask=mask)

    def outlier_scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """|W|·‖X‖; given a Hessian (and no sq_norm), ‖X_j‖² is read off diag H up to its constant scale.

        OWL's pre-pass collects only ‖X‖² (``outlier_needs``); the Hessian path serves callers that
        hold SparseGPT's own statistics.
        """
        if stats is not None and stats.hessian is not None:
            norms = torch.diagonal(stats.hessian).to(weight.device, torch.float32).clamp_min(0).sqrt()
            return weight.abs().float() * norms.unsqueeze(0)
        return super().outlier_scores(weight, stats)
