"""Router losses. Pure functions over router scores and selections.

Shapes: T tokens, E experts, K slots. ``token_mask`` [T] bool marks real (non-padding)
tokens; masked tokens contribute to no term.
"""

from __future__ import annotations

import torch


def _masked_mean_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token dimension (dim 0) of ``x`` [T, ...], ignoring masked rows."""
    if token_mask is None:
        return x.mean(dim=0)
    m = token_mask.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (x * m).sum(dim=0) / m.sum().clamp_min(1)


def expert_counts(
    topk_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[E] assignments per expert from ``topk_index`` [T, K], via scatter_add (no one-hot).

    ``kept`` [T, K] bool excludes dropped slots; ids >= E are ignored.
    """
    w = torch.ones_like(topk_index, dtype=dtype)
    if token_mask is not None:
        w = w * token_mask.to(dtype).unsqueeze(-1)
    if kept is not None:
        w = w * kept.to(dtype)
    idx = topk_index.reshape(-1)
    w = w.reshape(-1) * (idx < num_experts).to(dtype)
    out = torch.zeros(num_experts + 1, dtype=dtype, device=topk_index.device)
    out.scatter_add_(0, idx.clamp(max=num_experts), w)
    return out[:num_experts]


def load_balancing_loss(
    probs: torch.Tensor,
    topk_index: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / transformers load-balancing loss for one layer: ``E * sum_e f_e * P_e``.

    ``probs`` [T, E] is the softmax router distribution, ``topk_index`` [T, K] the chosen
    experts. f_e = (assignments to e over all K slots) / T_valid and P_e = mean router
    probability of e, exactly as transformers' ``load_balancing_loss_func`` computes them
    (so a uniform router scores K, not 1). Fedus et al. 2021, eq. 4.
    """
    num_experts = probs.shape[-1]
    probs = probs.float()
    counts = expert_counts(topk_index, num_experts, token_mask)
    if token_mask is None:
        n_tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
    else:
        n_tokens = token_mask.float().sum().clamp_min(1)
    f = counts / n_tokens
    p = _masked_mean_rows(probs, token_mask)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    ``logits`` [T, E].
    """
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    return _masked_mean_rows(z, token_mask)
