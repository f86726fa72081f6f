"""The naive MoE monitor of the seeds' sketches: the baseline of benchmarks/monitor_overhead.py.

What the seeds (``/work/shared/seeds/000_*.txt`` "GramSpec analyser" and
``001_*.txt`` "MoE monitoring callback") sketch, written out once so that the benchmark
can measure it beside moescope:

- one forward hook per router (the ``gate`` / ``router`` child of an MoE block, whose
  transformers 5.x forward returns ``(router_logits [T, E], top_k_weights [T, K],
  top_k_index [T, K])``);
- per call, a Python loop over the E experts: ``mask = selected == e``,
  ``count = mask.sum().item()``, ``weight = weights[mask].sum().item()`` (one host sync
  and one boolean-mask gather per expert);
- the routing entropy ``-(p * log(p + 1e-10)).sum(-1).mean().item()`` and the
  utilisation rate with ``.item()``;
- every per-call result appended to Python lists that are never trimmed
  (``self.expert_usage_history.append(usage_counts)`` in the seed), so memory grows
  linearly with the number of steps.

It computes less than moescope (no co-activation, aux loss, z-loss, top-1 margin,
padding mask or NaN handling): it is the *cheap* end of what the seeds describe, so any
overhead it shows is a lower bound for a naive implementation of the full metric set.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

__all__ = ["NaiveMonitor", "find_routers"]


def find_routers(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{router path: (router module, E)}`` for every ``gate`` / ``router`` child of a block
    that also has an ``experts`` child (the transformers 5.x MoE layout)."""
    out: dict[str, tuple[nn.Module, int]] = {}
    for name, block in model.named_modules():
        if not hasattr(block, "experts"):
            continue
        for child in ("gate", "router"):
            router = getattr(block, child, None)
            weight = getattr(router, "weight", None)
            if isinstance(router, nn.Module) and isinstance(weight, torch.Tensor):
                path = f"{name}.{child}" if name else child
                out[path] = (router, int(weight.shape[0]))
                break
    if not out:
        raise ValueError(
            f"NaiveMonitor found no MoE router in {type(model).__name__}: it looks for a "
            "'gate' or 'router' child (with a weight [E, H]) next to an 'experts' child."
        )
    return out


class NaiveMonitor:
    """Per-layer forward hooks with a Python loop over experts and ``.item()`` per value.

    Args:
        model: a transformers 5.x MoE model (routers returning ``(logits, weights, index)``).
        attach: install the hooks now.

    ``history[layer]`` is a list with one entry per router call:
    ``{"counts": [E ints], "weights": [E floats], "entropy": float, "utilization": float}``.
    It is never trimmed (the seeds' behaviour): ``state_nbytes()`` grows with the steps.
    """

    def __init__(self, model: nn.Module, attach: bool = True) -> None:
        self.model = model
        self.routers = find_routers(model)
        self.history: dict[str, list[dict[str, Any]]] = {p: [] for p in self.routers}
        self._window_start: dict[str, int] = {p: 0 for p in self.routers}
        self._handles: list[Any] = []
        if attach:
            self.attach()

    def attach(self) -> NaiveMonitor:
        """Register one forward hook per router (idempotent)."""
        if not self._handles:
            for path, (router, num_experts) in self.routers.items():
                self._handles.append(
                    router.register_forward_hook(self._make_hook(path, num_experts))
                )
        return self

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NaiveMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _make_hook(self, path: str, num_experts: int) -> Any:
        history = self.history[path]

        @torch.no_grad()
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            logits, weights, selected = out[0], out[1], out[2]
            selected_flat = selected.reshape(-1)
            weights_flat = weights.reshape(-1)
            counts: list[int] = []
            expert_weights: list[float] = []
            # The seeds' pattern, kept on purpose: one mask, two host syncs per expert.
            for expert_idx in range(num_experts):
                mask = selected_flat == expert_idx
                counts.append(int(mask.sum().item()))
                expert_weights.append(float(weights_flat[mask].sum().item()))
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = (-torch.sum(probs * torch.log(probs + 1e-10), dim=-1)).mean().item()
            utilization = (torch.tensor(counts) > 0).float().mean().item()
            history.append(
                {
                    "counts": counts,
                    "weights": expert_weights,
                    "entropy": entropy,
                    "utilization": utilization,
                }
            )

        return hook

    def snapshot(self, step: int | None = None) -> dict[str, float]:
        """Flat ``moe/...`` metrics of the calls since the previous snapshot (Python math).

        The history itself is kept (as in the seeds), only the window start moves.
        """
        metrics: dict[str, float] = {}
        cvs: list[float] = []
        entropies: list[float] = []
        unused_total = 0
        for path, rows in self.history.items():
            window = rows[self._window_start[path] :]
            self._window_start[path] = len(rows)
            if not window:
                continue
            num_experts = len(window[0]["counts"])
            counts = [sum(r["counts"][e] for r in window) for e in range(num_experts)]
            mean = sum(counts) / num_experts
            std = math.sqrt(sum((c - mean) ** 2 for c in counts) / num_experts)
            cv = std / mean if mean > 0 else float("nan")
            entropy = sum(r["entropy"] for r in window) / len(window)
            unused = sum(1 for c in counts if c == 0)
            metrics[f"moe/{path}/cv"] = cv
            metrics[f"moe/{path}/max_over_mean"] = max(counts) / mean if mean > 0 else float("nan")
            metrics[f"moe/{path}/routing_entropy"] = entropy
            metrics[f"moe/{path}/unused_experts"] = float(unused)
            cvs.append(cv)
            entropies.append(entropy)
            unused_total += unused
        if cvs:
            metrics["moe/avg_expert_cv"] = sum(cvs) / len(cvs)
            metrics["moe/avg_routing_entropy"] = sum(entropies) / len(entropies)
            metrics["moe/total_unused_experts"] = float(unused_total)
        if step is not None:
            metrics["step"] = float(step)
        return metrics

    def num_records(self) -> int:
        """Router calls recorded so far (all layers)."""
        return sum(len(rows) for rows in self.history.values())

    def state_nbytes(self) -> int:
        """Bytes held by the history lists: list objects, row dicts and their Python numbers.

        Small ints (-5..256) are shared by CPython but counted anyway: this measures what
        the data structure references, the growth is what matters.
        """
        total = 0
        for rows in self.history.values():
            total += sys.getsizeof(rows)
            for row in rows:
                total += sys.getsizeof(row)
                for value in row.values():
                    total += sys.getsizeof(value)
                    if isinstance(value, list):
                        total += sum(sys.getsizeof(v) for v in value)
        return total
