"""Structured OBS: saliencies and compensation for removing whole groups of input columns.

A structured unit is a group ``Q`` of input columns of one consumer layer ``W: (d_out,
d_in)``: one column of ``down_proj`` for an MLP channel (its producing rows of
``gate_proj``/``up_proj`` then carry no signal), ``head_dim`` columns of ``o_proj`` for an
attention head. Removing ``Q`` and moving the kept columns to minimise the layer's loss
``1/2 tr(G dW A dW^T)`` under the curvature ``F = G (x) A`` (``A`` the input factor, the
layer-wise ``H``; ``G`` the output factor, ``I`` for the layer-wise method) is the group OBS
step (Hassibi & Stork 1992 eq. 5 for a set; Kurtic et al. 2022; LLM Surgeon, van der
Ouderaa et al. 2024, eq. 7 for whole columns):

    dW = -W_Q ([A^-1]_QQ)^-1 [A^-1]_{Q,:}               (the same whatever G is)
    L_Q = 1/2 tr(G W_Q ([A^-1]_QQ)^-1 W_Q^T)

The update does not depend on ``G`` because the constraint ``W'_{:,Q} = 0`` fixes whole
columns: every row is moved by the same least-squares solve over ``A``, so ``G`` only weighs
which groups go. For ``G = I`` the update is exactly the least-squares optimum
``W'_K = W A_{:,K} A_KK^-1`` of ``||(W' - W) X^T||^2`` over the kept columns ``K``.

Baseline scores without compensation: ``activation`` (Wanda-style, ``||W_:,j|| ||X_j||``, a
group summing its columns') and ``weight_norm`` (``||W_:,Q||_F``).

Shapes: ``W: (d_out, d_in)``; ``A``, ``A^-1``: ``(d_in, d_in)``; ``G``: ``(d_out, d_out)``;
``groups``: ``(n_groups, group_size)`` column indices, each group disjoint.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument

SCORES = ("obs", "activation", "weight_norm")


def _check_groups(groups: torch.Tensor, d_in: int) -> torch.Tensor:
    groups = torch.as_tensor(groups, dtype=torch.long)
    if groups.ndim != 2 or groups.numel() == 0:
        raise InvalidArgument(f"groups must be a non-empty (n_groups, group_size) index "
                              f"tensor, got shape {tuple(groups.shape)}")
    flat = groups.flatten()
    if int(flat.min()) < 0 or int(flat.max()) >= d_in:
        raise InvalidArgument(f"group columns must lie in [0, {d_in})")
    if flat.unique().numel() != flat.numel():
        raise InvalidArgument("groups must be disjoint (a column in two groups)")
    return groups


def obs_group_saliency(weight: torch.Tensor, hessian_inverse: torch.Tensor, groups: torch.Tensor,
                       output_factor: torch.Tensor | None = None) -> torch.Tensor:
    """``L_Q = 1/2 tr(G W_Q ([A^-1]_QQ)^-1 W_Q^T)`` of removing each group alone:
    ``(n_groups,)``. ``hessian_inverse``: the damped ``A^-1``; ``output_factor``: ``G``
    (None: ``I``, the layer-wise saliency ``1/2 sum_i w_iQ ([A^-1]_QQ)^-1 w_iQ^T``)."""
    groups = _check_groups(groups, weight.shape[1]).to(weight.device)
    if output_factor is not None and output_factor.shape != (weight.shape[0], weight.shape[0]):
        raise InvalidArgument(f"output factor G must be ({weight.shape[0]}, "
                              f"{weight.shape[0]}), got {tuple(output_factor.shape)}")
    if groups.shape[1] == 1:  # single columns (MLP channels): no solve, one vectorised step
        columns = groups[:, 0]
        removed = weight[:, columns]                                        # (d_out, n)
        weighted = (output_factor.to(removed) @ removed if output_factor is not None
                    else removed)
        return 0.5 * (weighted * removed).sum(dim=0) / torch.diagonal(hessian_inverse)[columns]
    blocks = hessian_inverse[groups[:, :, None], groups[:, None, :]]      # (n, k, k)
    removed = weight[:, groups].permute(1, 2, 0)                            # (n, k, d_out)
    coefficients = torch.linalg.solve(blocks, removed)                      # ([A^-1]_QQ)^-1 W_Q^T
    if output_factor is not None:
        removed = removed @ output_factor.to(removed)                       # (G W_Q)^T
    return 0.5 * (coefficients * removed).sum(dim=(1, 2))


def activation_scores(weight: torch.Tensor, hessian: torch.Tensor,
                      groups: torch.Tensor) -> torch.Tensor:
    """``sum_{j in Q} ||W_:,j|| ||X_j||`` per group: ``(n_groups,)``; ``||X_j||`` is taken
    from ``diag(H)`` (``H = 2 X^T X / n``, so ``||X_j|| = sqrt(n H_jj / 2)``, up to the
    common factor)."""
    groups = _check_groups(groups, weight.shape[1]).to(weight.device)
    per_column = weight.norm(dim=0) * torch.diagonal(hessian).clamp_min(0).sqrt().to(weight)
    return per_column[groups].sum(dim=1)


def weight_norm_scores(weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``||W_:,Q||_F`` per group: ``(n_groups,)``."""
    groups = _check_groups(groups, weight.shape[1]).to(weight.device)
    return (weight * weight).sum(dim=0)[groups].sum(dim=1).sqrt()


def remove_column_groups(weight: torch.Tensor, columns: torch.Tensor,
                         hessian_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` with ``columns`` set to zero, the kept columns moved by the joint group OBS
    update ``-W_Q ([A^-1]_QQ)^-1 [A^-1]_{Q,:}`` over ``hessian_inverse`` (the damped
    ``A^-1``); None: no compensation, the columns only zeroed. A new tensor."""
    index = torch.as_tensor(columns, dtype=torch.long, device=weight.device)
    if index.ndim != 1 or index.numel() == 0 or index.unique().numel() != index.numel():
        raise InvalidArgument("columns must be a non-empty list of distinct column indices")
    if int(index.min()) < 0 or int(index.max()) >= weight.shape[1]:
        raise InvalidArgument(f"columns must lie in [0, {weight.shape[1]})")
    if hessian_inverse is None:
        new_weight = weight.clone()
    else:
        block = hessian_inverse[index][:, index]                            # (|Q|, |Q|)
        coefficients = torch.linalg.solve(block, weight[:, index].T).T      # W_Q ([A^-1]_QQ)^-1
        new_weight = weight - coefficients @ hessian_inverse[index]
    new_weight[:, index] = 0
    return new_weight


def greedy_group_obs(weight: torch.Tensor, hessian_inverse: torch.Tensor, groups: torch.Tensor,
                     count: int, *, parts: torch.Tensor | None = None,
                     output_factor: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Remove ``count`` of ``groups`` one at a time, each the group of least OBS saliency at
    that moment (Hassibi & Stork's greedy step for groups; ZipLM, Kurtic et al. 2023, alg. 1).

    After each removal the kept columns are compensated and ``A^-1`` is downdated to the
    inverse over the remaining columns, ``A^-1 <- A^-1 - [A^-1]_{:,Q} ([A^-1]_QQ)^-1
    [A^-1]_{Q,:}``, so the next saliencies are exact for the weight as it now is. The
    sequence of exact steps ends at the least-squares optimum for the removed set, but the
    set is chosen knowing what each removal did to the others, which the scores of one
    moment (:func:`obs_group_saliency` once, then the lowest) do not. ``parts``: ``count``
    from each part (grouped-query attention), each step choosing among the parts that still
    owe removals. ``output_factor``: ``G`` weighs the saliency; the update is the same.

    Returns the new weight (removed columns exactly 0), the positions in ``groups`` removed
    (ascending) and the predicted loss (the sum of the steps' saliencies, under the damped
    ``A`` of ``hessian_inverse``). Works in the dtype given (float64 recommended).
    """
    groups = _check_groups(groups, weight.shape[1]).to(weight.device)
    n_groups = groups.shape[0]
    owed = None
    if parts is not None:
        if not 0 <= count <= parts.shape[1]:
            raise InvalidArgument(f"cannot remove {count} of {parts.shape[1]} units per group")
        part_of = torch.empty(n_groups, dtype=torch.long)
        for index, part in enumerate(parts):
            part_of[part] = index
        owed = torch.full((parts.shape[0],), count)
        total = count * parts.shape[0]
    else:
        if not 0 <= count <= n_groups:
            raise InvalidArgument(f"cannot remove {count} of {n_groups} units")
        total = count
    weight = weight.clone()
    inverse = hessian_inverse.clone()
    alive = torch.ones(n_groups, dtype=torch.bool)
    removed: list[int] = []
    predicted = 0.0
    for _ in range(total):
        candidates = alive.clone()
        if owed is not None:
            candidates &= owed[part_of] > 0
        positions = candidates.nonzero().flatten()
        scores = obs_group_saliency(weight, inverse, groups[positions], output_factor)
        best = int(positions[int(scores.argmin())])
        predicted += float(scores.min())
        columns = groups[best]
        if columns.numel() == 1:  # rank-one updates in place (no d_in^2 temporary per step)
            column = int(columns[0])
            row = inverse[column].clone()                                   # [A^-1]_{q,:}
            weight.addr_(weight[:, column] / row[column], row, alpha=-1.0)
            inverse.addr_(row, row, alpha=-1.0 / float(row[column]))
        else:
            block = inverse[columns][:, columns]
            coefficients = torch.linalg.solve(block, weight[:, columns].T).T  # W_Q ([A^-1]_QQ)^-1
            rows_q = inverse[columns]                                       # [A^-1]_{Q,:}
            weight -= coefficients @ rows_q
            inverse -= rows_q.T @ torch.linalg.solve(block, rows_q)
        weight[:, columns] = 0
        # a removed column is decoupled: its row and column of the downdated inverse are 0
        # up to rounding; a unit diagonal keeps later solves away from them regular
        inverse[columns, :] = 0
        inverse[:, columns] = 0
        inverse[columns, columns] = 1
        alive[best] = False
        removed.append(best)
        if owed is not None:
            owed[part_of[best]] -= 1
    return weight, torch.tensor(sorted(removed), dtype=torch.long), predicted


class TargetCovariance:
    """Streaming ``C = 2 T^T X / n`` between a layer's inputs ``X: (n, d_in)`` and the outputs
    ``T: (n, d_out)`` it should produce (the cross term of the loss ``||W' X^T - T^T||^2 / n``
    whose Hessian is ``H = 2 X^T X / n``), summed in ``dtype``: float32 like the Hessian
    accumulator by default (float64 sums cost several times the time on CPU)."""

    def __init__(self, d_out: int, d_in: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(d_out, d_in, dtype=dtype, device=device)
        self.n_tokens = 0

    def add_batch(self, targets: torch.Tensor, inputs: torch.Tensor) -> None:
        t = targets.reshape(-1, self.sum.shape[0]).to(self.sum)
        x = inputs.reshape(-1, self.sum.shape[1]).to(self.sum)
        if t.shape[0] != x.shape[0]:
            raise InvalidArgument(f"{t.shape[0]} target rows for {x.shape[0]} input rows")
        self.sum.addmm_(t.T, x)
        self.n_tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """``C`` in float64."""
        if self.n_tokens == 0:
            raise InvalidArgument("no tokens were seen")
        return self.sum.double() * (2.0 / self.n_tokens)


def refit_to_target(covariance: torch.Tensor, hessian_inverse: torch.Tensor) -> torch.Tensor:
    """``W* = C A^-1``: the weight whose outputs best match the target (least squares, under
    the damped ``A`` of ``hessian_inverse``). Since ``||W' X^T - T^T||^2 / n`` equals
    ``sum_r (w'_r - w*_r) A (w'_r - w*_r)^T / 2`` plus a constant, removing columns of the
    layer against the target is the OBS problem of ``W*`` (:func:`greedy_group_obs`)."""
    return covariance @ hessian_inverse


def lowest(scores: torch.Tensor, count: int, *, parts: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``count`` lowest ``scores``, ascending by index. ``parts``: ``(n_parts,
    part_size)`` indices into ``scores``; then ``count`` from each part (grouped-query
    attention: the same number of query heads from every key/value group)."""
    if parts is None:
        if not 0 <= count <= scores.numel():
            raise InvalidArgument(f"cannot remove {count} of {scores.numel()} units")
        return scores.argsort(stable=True)[:count].sort().values
    if not 0 <= count <= parts.shape[1]:
        raise InvalidArgument(f"cannot remove {count} of {parts.shape[1]} units per group")
    chosen = [part[scores[part].argsort(stable=True)[:count]] for part in parts]
    return torch.cat(chosen).sort().values


__all__ = ["SCORES", "TargetCovariance", "activation_scores", "greedy_group_obs", "lowest",
           "obs_group_saliency", "refit_to_target", "remove_column_groups", "weight_norm_scores"]
