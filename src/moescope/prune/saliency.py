"""Expert saliency from measured routing, and which experts to keep (pure numpy math).

Per MoE layer with E routed experts, over the tokens of a calibration pass (T valid
tokens, K slots each; a slot = one (token, expert) assignment):

- ``frequency[e]``: slots routed to e (the monitor's ``usage_counts``);
- ``weight_mass[e]``: sum of the combine weights g_e(x) given to e (the monitor's
  ``weight_sums``);
- ``reap[e]``: REAP saliency (Lasby et al. 2025, "REAP: router-weighted expert activation
  pruning"): the mean over the slots routed to e of g_e(x) * ||f_e(x)||_2, f_e(x) the
  expert's output for token x; 0 for an expert no token chose;
- neuron statistics when they were tracked (``activated_neurons`` [E], mean activated
  neurons per routed slot; ``dead_neurons`` [E]): shown beside the scores, not used to
  order.

Orderings (:data:`ORDERINGS`): ``saliency`` (REAP), ``frequency``, ``weight`` (router-weight
mass) and ``reverse`` (the least REAP-salient first: the control that shows the ordering
matters). Ties are broken by frequency, then weight mass, then the lower expert id, so a
choice is deterministic.

Group-limited routers (DeepSeek-V3: ``n_group`` contiguous groups, ``topk_group`` kept per
token) keep the same number of experts in every group (:func:`keep_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ORDERINGS",
    "LayerSaliency",
    "expert_scores",
    "keep_count",
    "keep_experts",
    "reap_saliency",
]

ORDERINGS: tuple[str, ...] = ("saliency", "frequency", "weight", "reverse")


@dataclass
class LayerSaliency:
    """Measured importance of the experts of one MoE layer (module docstring).

    Shapes: E = ``num_experts``; every array is [E]. ``reap`` is None when the layer's
    expert outputs could not be captured (then only ``frequency`` / ``weight`` order it).
    ``tokens`` is the number of valid tokens seen; ``num_groups`` the router's expert
    groups (1 = ungrouped).
    """

    layer: str
    num_experts: int
    top_k: int
    tokens: int
    frequency: np.ndarray
    weight_mass: np.ndarray
    reap: np.ndarray | None = None
    num_groups: int = 1
    activated_neurons: np.ndarray | None = None
    dead_neurons: np.ndarray | None = None

    @property
    def unused(self) -> np.ndarray:
        """[k] ids of the experts no token was routed to."""
        return np.flatnonzero(self.frequency == 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: arrays as lists (None stays None)."""

        def arr(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(x) for x in a]

        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "num_groups": self.num_groups,
            "frequency": [int(x) for x in self.frequency],
            "weight_mass": arr(self.weight_mass),
            "reap": arr(self.reap),
            "activated_neurons": arr(self.activated_neurons),
            "dead_neurons": arr(self.dead_neurons),
        }


def reap_saliency(gated_norm_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """REAP saliency [E]: ``gated_norm_sums[e] / counts[e]`` (the mean over routed slots of
    g_e(x) * ||f_e(x)||), 0 where ``counts[e] == 0``. Inputs [E]; float64 out."""
    s = np.asarray(gated_norm_sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    out = np.zeros_like(s)
    np.divide(s, c, out=out, where=c > 0)
    return out


def expert_scores(sal: LayerSaliency, by: str) -> np.ndarray:
    """[E] float64 score, higher = keep first, for ordering ``by`` (:data:`ORDERINGS`).

    Raises:
        ValueError: unknown ordering, or ``saliency``/``reverse`` without REAP scores.
    """
    if by == "frequency":
        return np.asarray(sal.frequency, dtype=np.float64)
    if by == "weight":
        return np.asarray(sal.weight_mass, dtype=np.float64)
    if by in ("saliency", "reverse"):
        if sal.reap is None:
            raise ValueError(
                f"{sal.layer}: no REAP saliency (its experts' outputs could not be captured); "
                "order by frequency instead"
            )
        s = np.asarray(sal.reap, dtype=np.float64)
        return s if by == "saliency" else -s
    raise ValueError(f"unknown ordering {by!r}; choose one of {', '.join(ORDERINGS)}")


def _rank(score: np.ndarray, sal: LayerSaliency, reverse: bool) -> np.ndarray:
    """Expert ids, most worth keeping first (ties: frequency, weight mass, lower id; all
    reversed for the control ordering except the id)."""
    sign = -1.0 if reverse else 1.0
    freq = sign * np.asarray(sal.frequency, dtype=np.float64)
    mass = sign * np.asarray(sal.weight_mass, dtype=np.float64)
    ids = np.arange(score.shape[0])
    # np.lexsort sorts by the last key first, ascending: negate to sort descending.
    return np.lexsort((ids, -mass, -freq, -score))


def keep_experts(sal: LayerSaliency, n: int, by: str = "saliency") -> np.ndarray:
    """The ``n`` expert ids to keep in this layer, ascending.

    With ``num_groups`` G > 1 each group keeps ``n / G`` of its own experts (its best by
    the ordering), so the pruned router's groups stay equal. Raises ``ValueError`` when
    ``n`` is not in [1, E] or not a multiple of G.
    """
    e, g = sal.num_experts, max(1, sal.num_groups)
    if not 1 <= n <= e:
        raise ValueError(f"{sal.layer}: cannot keep {n} of {e} experts")
    if n % g:
        raise ValueError(
            f"{sal.layer}: keeping {n} experts would leave its {g} router groups unequal; "
            f"keep a multiple of {g}"
        )
    score = expert_scores(sal, by)
    order = _rank(score, sal, reverse=by == "reverse")
    if g == 1:
        return np.sort(order[:n])
    per, size = n // g, e // g
    group_of = order // size
    kept = [order[group_of == i][:per] for i in range(g)]
    return np.sort(np.concatenate(kept))


def keep_count(
    num_experts: int,
    top_k: int,
    *,
    keep: int | None = None,
    fraction: float | None = None,
    num_groups: int = 1,
) -> int:
    """Experts per layer to keep from ``keep`` (a count) or ``fraction`` (of E, rounded
    to the nearest multiple of ``num_groups``). Raises ``ValueError`` (one line, what to
    do) when it is fewer than ``top_k``, more than E, or would leave groups unequal."""
    if (keep is None) == (fraction is None):
        raise ValueError("give either a number of experts to keep or a fraction, not both")
    g = max(1, num_groups)
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--keep-fraction must be in (0, 1], got {fraction}")
        n = max(g, round(fraction * num_experts / g) * g)
    else:
        assert keep is not None
        n = int(keep)
    if n > num_experts:
        raise ValueError(f"cannot keep {n} experts: the model has {num_experts} per layer")
    if n < top_k:
        raise ValueError(
            f"keeping {n} experts is fewer than the {top_k} each token is routed to (top-k); "
            f"keep at least {top_k}"
        )
    if n % g:
        raise ValueError(
            f"keeping {n} of {num_experts} experts would leave the router's {g} expert groups "
            f"unequal; keep a multiple of {g}"
        )
    return n
