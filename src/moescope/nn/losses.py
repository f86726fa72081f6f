"""Router losses. Pure functions over router scores and selections.

Shapes: T tokens, E experts, K slots. ``token_mask`` [T] bool marks real (non-padding)
tokens; masked tokens contribute to no term.
"""

from __future__ import annotations

import torch


def _masked_mean_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token dimension (dim 0) of ``x`` [T, ...], ignoring masked rows."""
    if token_mask is None:
        # sum / max(T, 1): an empty batch gives 0 instead of NaN.
        return x.sum(dim=0) / max(x.shape[0], 1)
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
        n_tokens = torch.tensor(float(max(probs.shape[0], 1)), device=probs.device)
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


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor ``x`` [E]: var(x) / (mean(x)^2 + eps).

    Population variance (ddof = 0), as in the reference implementation of Shazeer et al.
    2017 (tensor2tensor ``cv_squared``) and the ``cv`` metric of DESIGN.md. Zero when
    every entry is equal; differentiable.
    """
    x = x.float()
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return var / (mean**2 + eps)


def importance_loss(
    probs_or_gates: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Importance loss of Shazeer et al. 2017 ("Outrageously large neural networks", eq. 6).

    ``probs_or_gates`` [T, E] are the gate values G(x) of every token (the sparse gates
    after KeepTopK + softmax in the paper; a dense router distribution also works).
    Importance_e = sum over valid tokens of G(x)_e; the loss is CV(Importance)^2
    (see :func:`cv_squared`), unweighted (the paper's w_importance is the caller's).
    Padding tokens (``token_mask`` [T] False) contribute nothing. Returns a scalar.
    """
    g = probs_or_gates.float()
    if token_mask is not None:
        g = g * token_mask.to(g.dtype).unsqueeze(-1)
    return cv_squared(g.sum(dim=0))


def noisy_topk_load(
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: torch.Tensor,
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smooth load estimator of Shazeer et al. 2017 (appendix A, eqs. 8-9): [E].

    Load_e = sum over valid tokens of P(x, e), where P(x, e) = Phi((clean_e - thr) / std_e)
    is the probability that expert e stays in the top-k when only its own noise is
    re-drawn: thr is the k-th highest noisy logit excluding e (the (k+1)-th overall when e
    is itself in the top-k, the k-th otherwise). All inputs [T, E]; requires
    ``top_k < E`` (with top_k = E every expert always wins and the load is constant).
    """
    num_experts = clean_logits.shape[-1]
    if not 1 <= top_k < num_experts:
        raise ValueError(f"noisy_topk_load needs 1 <= top_k < E={num_experts}, got {top_k}")
    top_v = noisy_logits.topk(top_k + 1, dim=-1).values
    thr_if_in = top_v[:, top_k : top_k + 1]
    thr_if_out = top_v[:, top_k - 1 : top_k]
    is_in = noisy_logits > thr_if_in
    p_if_in = torch.special.ndtr((clean_logits - thr_if_in) / noise_std)
    p_if_out = torch.special.ndtr((clean_logits - thr_if_out) / noise_std)
    p = torch.where(is_in, p_if_in, p_if_out)
    if token_mask is not None:
        p = p * token_mask.to(p.dtype).unsqueeze(-1)
    return p.sum(dim=0)


def sequence_aux_loss(
    probs: torch.Tensor,
    topk_index: torch.Tensor,
    batch_size: int,
    seq_len: int,
    token_mask: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Sequence-wise balance loss of DeepSeek-V2 (eqs. 12-14) / DeepSeek-V3 (eqs. 17-20).

    ``probs`` [T, E] router scores (softmax probabilities, or DeepSeek-V3 sigmoid
    affinities), ``topk_index`` [T, K] the selected experts, T = ``batch_size * seq_len``
    with the sequence axis innermost (rows b*seq_len ... (b+1)*seq_len - 1 are sequence b).
    For every sequence with T_b valid tokens:

    - s'_{t,i} = s_{t,i} / sum_j s_{t,j}  (V3's normalisation; a no-op for softmax)
    - f_i = E / (K * T_b) * #{valid t in b : i in TopK(t)}
    - P_i = (1 / T_b) * sum_{valid t in b} s'_{t,i}
    - L_b = sum_i f_i * P_i

    The loss is alpha times the mean of L_b over sequences with at least one valid token
    (a balanced router scores 1). Padding (``token_mask`` [T] False) counts nowhere.
    """
    n_tokens, num_experts = probs.shape
    if n_tokens != batch_size * seq_len:
        raise ValueError(
            f"probs has {n_tokens} rows but batch_size * seq_len = {batch_size * seq_len}; "
            "pass the flattened [batch * seq, E] scores of one batch"
        )
    k = topk_index.shape[-1]
    s = probs.float()
    s = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    if token_mask is None:
        m = torch.ones(n_tokens, dtype=s.dtype, device=s.device)
    else:
        m = token_mask.reshape(-1).to(s.dtype)
    m_bs = m.view(batch_size, seq_len)
    t_b = m_bs.sum(dim=1)  # [B]
    counts = torch.zeros(batch_size, num_experts, dtype=s.dtype, device=s.device)
    idx = topk_index.reshape(batch_size, seq_len * k).long()
    counts.scatter_add_(1, idx, m_bs.repeat_interleave(k, dim=1))
    denom = t_b.clamp_min(1).unsqueeze(-1)
    f = num_experts / k * counts / denom
    p = (s * m.unsqueeze(-1)).view(batch_size, seq_len, num_experts).sum(dim=1) / denom
    per_seq = (f * p).sum(dim=-1)
    has_tokens = (t_b > 0).to(s.dtype)
    return alpha * (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)
