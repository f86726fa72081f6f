"""Routers: map token hidden states [T, H] to a RouterOutput.

Every router returns the same RouterOutput type so that layers, losses and the monitor
treat them alike. Conventions shared by all routers here:

- ``forward(x [T, H], token_mask [T] bool | None)``; ``token_mask`` False marks padding.
- Router logits are computed in float32 from a float32 copy of ``x`` (the Switch
  Transformer's "selective precision": the router's softmax/sigmoid and top-k are the
  numerically fragile part), so bfloat16 models route like float32 ones. ``logits`` and
  ``probs`` are float32; ``topk_weight`` comes back in ``x.dtype``.
- No Python loop over tokens; the only loops are over at most E vectorised rounds
  (``SwitchRouter(overflow="next")``).
- Capacity-limited routers (Switch, expert choice) never dispatch padding tokens: their
  slots are marked dropped and they take no capacity; capacities are computed from the
  number of valid tokens T_valid on the device (no host sync).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from moescope.nn.losses import (
    cv_squared,
    expert_counts,
    importance_loss,
    load_balancing_loss,
    noisy_topk_load,
    router_z_loss,
    sequence_aux_loss,
)
from moescope.nn.router_output import RouterOutput


def _check_inputs(x: torch.Tensor, token_mask: torch.Tensor | None, hidden_size: int) -> None:
    if x.dim() != 2 or x.shape[-1] != hidden_size:
        raise ValueError(
            f"router input must be [T, H={hidden_size}] (flatten batch and sequence first), "
            f"got shape {tuple(x.shape)}"
        )
    if token_mask is not None:
        if token_mask.shape != x.shape[:1]:
            raise ValueError(
                f"token_mask must be [T={x.shape[0]}] (flattened like x), got {tuple(token_mask.shape)}"
            )
        if token_mask.dtype != torch.bool:
            raise TypeError(
                f"token_mask must be a bool tensor (True = real token), got {token_mask.dtype}; "
                "use attention_mask.bool()"
            )


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, E] = x W^T, whatever the dtypes of ``x`` and ``weight``."""
    return nn.functional.linear(x.float(), weight.float())


def _ceil_capacity(
    capacity_factor: float, n_tokens: int | torch.Tensor, num_experts: int, device: torch.device
) -> torch.Tensor:
    """ceil(capacity_factor * n_tokens / E) as an int64 scalar tensor on ``device``.

    float64 arithmetic in the order (n * cf) / E, so the result equals Python's
    ``math.ceil(cf * n / E)`` bit for bit (MPS has no float64 and uses float32).
    """
    if isinstance(n_tokens, int):
        return torch.tensor(math.ceil(capacity_factor * n_tokens / num_experts), device=device)
    dt = torch.float32 if n_tokens.device.type == "mps" else torch.float64
    return torch.ceil(n_tokens.to(dt) * capacity_factor / num_experts).long()


def _rank_within_expert(
    expert: torch.Tensor, active: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """[T] int64: rank (0-based, in token order) of each active token among the active
    tokens sent to the same expert. Values at inactive positions are meaningless.

    One stable sort instead of a [T, E] one-hot cumsum, so memory stays O(T) for large E.
    """
    n = expert.shape[0]
    key = torch.where(active, expert, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(n, device=expert.device) - starts[key[order]]
    return torch.empty_like(key).scatter_(0, order, rank_sorted)


def _valid_mask(token_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return token_mask


def _n_valid(token_mask: torch.Tensor | None, n: int) -> int | torch.Tensor:
    return n if token_mask is None else token_mask.sum()


class TopKRouter(nn.Module):
    """Softmax-then-top-k router (Shazeer et al. 2017 without noise; Mixtral, Qwen-MoE).

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K experts per token.
        normalize: renormalise the K selected probabilities to sum to 1 (Mixtral,
            ``norm_topk_prob=True``); otherwise the raw softmax probabilities are the
            combine weights (Qwen1.5-MoE, OLMoE).

    Input ``x`` [T, H]; optional ``token_mask`` [T] bool excludes padding from the losses.
    Output: RouterOutput with ``losses = {"aux_loss", "z_loss"}``; no slot is dropped.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        _check_inputs(x, token_mask, self.hidden_size)
        logits = _router_logits(x, self.weight)
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return RouterOutput(
            logits=logits,
            probs=probs,
            topk_index=top_i,
            topk_weight=top_p.to(x.dtype),
            losses={
                "aux_loss": load_balancing_loss(probs, top_i, token_mask),
                "z_loss": router_z_loss(logits, token_mask),
            },
        )


class SwitchRouter(nn.Module):
    """Top-1 router with an expert capacity (Switch Transformer, Fedus et al. 2021).

    Every token picks its most probable expert; expert e processes at most
    ``capacity = ceil(capacity_factor * T_valid / E)`` tokens, T_valid = number of
    non-padding tokens (padding is never dispatched and takes no capacity).

    Overflow policy:

    - ``"drop"`` (the paper): an expert keeps its first ``capacity`` tokens in sequence
      order; later tokens are dropped (``dropped`` True, they pass through the residual).
    - ``"next"`` (the "token overflow" rule: go to the next most likely expert): rounds
      r = 0 .. E-1; in round r every valid token not yet placed offers itself to its
      (r+1)-th most probable expert, and each expert accepts offers in sequence order while
      it has room. So any first choice beats any second choice for a slot (GShard's
      priority of 1st over 2nd choices), and within a round earlier tokens win. A token
      still unplaced after E rounds (``max_rounds``) is dropped; after all E rounds that
      happens only when every expert is full.

    Args:
        hidden_size: H. num_experts: E.
        capacity_factor: > 0; 1.0 = exactly balanced buffers, the paper uses 1.0-1.25.
        overflow: ``"drop"`` or ``"next"``.
        jitter_eps: multiplicative input jitter x * U(1 - eps, 1 + eps), training only
            (the paper's exploration noise); 0 disables.
        max_rounds: ``"next"`` only: stop after this many rounds (default E; each round
            costs one sort of T ids, so a large E may want e.g. 2 or 4); 1 equals "drop".

    Output (T tokens, K = 1): ``topk_index`` [T, 1] the expert actually used (the first
    choice where the token was dropped), ``topk_weight`` [T, 1] the router probability of
    that expert (in ``x.dtype``), ``dropped`` [T, 1] (True for dropped and for padding
    tokens), ``losses = {"aux_loss", "z_loss"}``; ``aux_loss`` uses the first choices
    before capacity (the paper's f_i), ``z_loss`` is ST-MoE's.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        overflow: Literal["drop", "next"] = "drop",
        jitter_eps: float = 0.0,
        max_rounds: int | None = None,
    ):
        super().__init__()
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1 or None, got {max_rounds}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if overflow not in ("drop", "next"):
            raise ValueError(f'overflow must be "drop" or "next", got {overflow!r}')
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.overflow = overflow
        self.jitter_eps = jitter_eps
        self.max_rounds = max_rounds
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def capacity(self, n_valid: int | torch.Tensor) -> torch.Tensor:
        """Per-expert capacity for ``n_valid`` valid tokens (int64 scalar tensor)."""
        device = self.weight.device
        return _ceil_capacity(self.capacity_factor, n_valid, self.num_experts, device)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        _check_inputs(x, token_mask, self.hidden_size)
        n, e = x.shape[0], self.num_experts
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = _router_logits(x, self.weight)
        probs = torch.softmax(logits, dim=-1)
        valid = _valid_mask(token_mask, n, x.device)
        capacity = _ceil_capacity(self.capacity_factor, _n_valid(token_mask, n), e, x.device)

        if self.overflow == "drop":
            first = probs.argmax(dim=-1)
            chosen = first
            placed = valid & (_rank_within_expert(first, valid, e) < capacity)
        else:
            pref = probs.argsort(dim=-1, descending=True, stable=True)  # [T, E]
            first = pref[:, 0]
            chosen = first
            placed = torch.zeros(n, dtype=torch.bool, device=x.device)
            room = capacity.expand(e).clone()
            rounds = e if self.max_rounds is None else min(self.max_rounds, e)
            for r in range(rounds):  # at most E rounds of vectorised work; never over tokens
                cand = pref[:, r]
                active = valid & ~placed
                accept = active & (_rank_within_expert(cand, active, e) < room[cand])
                chosen = torch.where(accept, cand, chosen)
                placed = placed | accept
                room = room - torch.zeros_like(room).scatter_add_(0, cand, accept.long())

        topk_index = chosen.unsqueeze(-1)
        return RouterOutput(
            logits=logits,
            probs=probs,
            topk_index=topk_index,
            topk_weight=probs.gather(1, topk_index).to(x.dtype),
            dropped=(~placed).unsqueeze(-1),
            losses={
                "aux_loss": load_balancing_loss(probs, first.unsqueeze(-1), token_mask),
                "z_loss": router_z_loss(logits, token_mask),
            },
        )


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): experts pick tokens, not tokens experts.

    S = softmax over experts of every token's logits; each expert takes the ``capacity``
    tokens with the highest S[:, e] (a token may be taken by several experts or by none).
    ``capacity = min(ceil(T_valid * capacity_factor / E), T_valid)`` (the paper's
    k = n * c / e), or ``min(tokens_per_expert, T_valid)`` when that is given. Padding
    tokens are never picked and do not count in T_valid, so with padding each expert takes
    exactly its capacity among the valid tokens.

    Representation (K = E): ``topk_index[t, e] = e``; ``topk_weight[t, e] = S[t, e]`` if
    expert e picked token t else 0 (the paper's gating matrix G, in ``x.dtype``);
    ``dropped[t, e] = not picked``; ``unrouted`` [T] bool = valid tokens no expert took
    (they pass through the residual only). ``losses = {"z_loss"}``: the balance is
    perfect by construction, so there is no load-balancing loss.

    Args:
        hidden_size: H. num_experts: E.
        capacity_factor: c > 0 (average experts per token); ignored if
            ``tokens_per_expert`` is set.
        tokens_per_expert: fixed capacity per expert (>= 1).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        tokens_per_expert: int | None = None,
    ):
        super().__init__()
        if tokens_per_expert is None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if tokens_per_expert is not None and tokens_per_expert < 1:
            raise ValueError(f"tokens_per_expert must be >= 1, got {tokens_per_expert}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.tokens_per_expert = tokens_per_expert
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def capacity(self, n_valid: int | torch.Tensor) -> torch.Tensor:
        """Tokens each expert takes given ``n_valid`` valid tokens (int64 scalar tensor)."""
        device = n_valid.device if isinstance(n_valid, torch.Tensor) else self.weight.device
        if self.tokens_per_expert is not None:
            cap = torch.tensor(self.tokens_per_expert, device=device)
        else:
            cap = _ceil_capacity(self.capacity_factor, n_valid, self.num_experts, device)
        return torch.minimum(cap, torch.as_tensor(n_valid, device=device))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        _check_inputs(x, token_mask, self.hidden_size)
        n, e = x.shape[0], self.num_experts
        logits = _router_logits(x, self.weight)
        probs = torch.softmax(logits, dim=-1)
        valid = _valid_mask(token_mask, n, x.device)
        cap = self.capacity(_n_valid(token_mask, n))
        # Static top-k width from all T rows (an upper bound of cap, known on the host);
        # ranks >= cap (a device tensor) are discarded afterwards, so no host sync.
        if self.tokens_per_expert is not None:
            k_static = min(self.tokens_per_expert, n)
        else:
            k_static = min(math.ceil(self.capacity_factor * n / e), n)
        picked = torch.zeros(n, e, dtype=torch.bool, device=x.device)
        if k_static > 0:
            # Padding scores -1 < any probability, so valid tokens rank first.
            scores = probs.masked_fill(~valid.unsqueeze(-1), -1.0)
            top_tok = scores.topk(k_static, dim=0).indices  # [k, E]
            ranks = torch.arange(k_static, device=x.device).unsqueeze(-1)
            take = (ranks < cap) & valid[top_tok]
            picked.scatter_(0, top_tok, take)
        expert_ids = torch.arange(e, device=x.device).expand(n, e)
        return RouterOutput(
            logits=logits,
            probs=probs,
            topk_index=expert_ids,
            topk_weight=torch.where(picked, probs, 0.0).to(x.dtype),
            dropped=~picked,
            losses={"z_loss": router_z_loss(logits, token_mask)},
            unrouted=valid & ~picked.any(dim=-1),
        )


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

    H(x) = x W_g + StandardNormal() * (softplus(x W_noise) + noise_epsilon), the noise
    drawn only in training mode (eval routes on x W_g, deterministic);
    G(x) = softmax(KeepTopK(H(x), k)): the softmax runs over the k kept logits only (the
    paper's order), so the k weights sum to 1. ``noise_epsilon`` (1e-2) is the floor of
    the noise scale used by the paper's reference code (tensor2tensor). W_g and W_noise
    are trainable; W_noise starts at zero as in the paper (noise std softplus(0) + eps).

    ``forward(x [T, H], token_mask [T] | None, noise [T, E] | None)``: ``noise`` replaces
    the StandardNormal draw in training mode (for tests / reproducibility; ignored in
    eval). Output: ``logits`` = clean x W_g, ``probs`` = softmax(clean logits),
    ``topk_index``/``topk_weight`` [T, K] from H(x), and losses:

    - ``importance_loss``: CV(sum_x G(x))^2 (paper eq. 6, unweighted);
    - ``load_loss``: CV(Load)^2 with the smooth load estimator (appendix A, eqs. 8-11) in
      training when k < E; otherwise CV^2 of the hard per-expert counts (as the reference
      code does without noise);
    - ``aux_loss`` (Switch/transformers load balancing on ``probs``) and ``z_loss``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noise_epsilon: float = 1e-2):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_epsilon = noise_epsilon
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> RouterOutput:
        _check_inputs(x, token_mask, self.hidden_size)
        e, k = self.num_experts, self.top_k
        clean = _router_logits(x, self.weight)
        noisy_mode = self.training
        if noisy_mode:
            std = nn.functional.softplus(_router_logits(x, self.noise_weight)) + self.noise_epsilon
            if noise is None:
                noise = torch.randn_like(clean)
            elif noise.shape != clean.shape:
                raise ValueError(
                    f"noise must be [T, E]={tuple(clean.shape)}, got {tuple(noise.shape)}"
                )
            h = clean + noise.to(clean.dtype) * std
        else:
            h = clean
        top_v, top_i = h.topk(k, dim=-1)
        top_w = torch.softmax(top_v, dim=-1)
        gates = torch.zeros_like(clean).scatter(1, top_i, top_w)
        if noisy_mode and k < e:
            load = noisy_topk_load(clean, h, std, k, token_mask)
        else:
            load = expert_counts(top_i, e, token_mask)
        probs = torch.softmax(clean, dim=-1)
        return RouterOutput(
            logits=clean,
            probs=probs,
            topk_index=top_i,
            topk_weight=top_w.to(x.dtype),
            losses={
                "importance_loss": importance_loss(gates, token_mask),
                "load_loss": cv_squared(load),
                "aux_loss": load_balancing_loss(probs, top_i, token_mask),
                "z_loss": router_z_loss(clean, token_mask),
            },
        )


class GroupLimitedRouter(nn.Module):
    """DeepSeek-V3 router: sigmoid scores, correction bias, group-limited top-k.

    DeepSeek-V3 technical report (2024), sec. 2.1.2, and transformers'
    ``DeepseekV3TopkRouter`` (matched exactly, see tests):

    - s = sigmoid(x W^T) (float32) [T, E];
    - selection scores s + b, b = ``e_score_correction_bias`` [E] (a buffer; used for the
      choice only, never for the weights);
    - experts split into ``n_group`` contiguous groups; a group's score is the sum of its
      top-2 selection scores; the ``topk_group`` best groups stay, the others are masked;
    - top_k experts by selection score among the kept groups (slot order unspecified, as
      in transformers' ``topk(sorted=False)``);
    - weights = s of the chosen experts, divided by their sum (+1e-20) if
      ``norm_topk_prob``, times ``routed_scaling_factor``.

    Auxiliary-loss-free balancing: call :meth:`update_bias` with the per-expert load of a
    step (e.g. ``expert_counts(out.topk_index, E, token_mask)`` summed over the step's
    batches): b += bias_update_rate * sign(mean(load) - load).

    ``forward(x [T, H], token_mask [T] | None, seq_len: int | None)``: losses
    ``{"seq_aux_loss"}``, the complementary sequence-wise balance loss (V3 eqs. 17-20, see
    :func:`sequence_aux_loss`) with sequences of ``seq_len`` rows (default: the whole batch
    as one sequence), unweighted (the paper's alpha is the caller's).
    ``score_fn = "sigmoid"``; ``probs`` are the unbiased sigmoid scores.
    """

    e_score_correction_bias: torch.Tensor  # [E] buffer (registered in __init__)

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool = True,
        bias_update_rate: float = 1e-3,
    ):
        super().__init__()
        if n_group < 1 or num_experts % n_group != 0:
            raise ValueError(f"num_experts={num_experts} must be a multiple of n_group={n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        per_group = num_experts // n_group
        if not 1 <= top_k <= topk_group * per_group:
            raise ValueError(
                f"top_k must be in [1, topk_group * experts_per_group = {topk_group * per_group}], got {top_k}"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids from unbiased sigmoid scores [T, E] (bias + group limit)."""
        n, e = scores.shape
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            per_group = e // self.n_group
            group_scores = (
                choice.view(n, self.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(-1)
            )
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(n, e)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> RouterOutput:
        _check_inputs(x, token_mask, self.hidden_size)
        n = x.shape[0]
        logits = _router_logits(x, self.weight)
        scores = logits.sigmoid()
        top_i = self.select(scores)
        top_w = scores.gather(1, top_i)
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        top_w = top_w * self.routed_scaling_factor
        if seq_len is None:
            seq = max(n, 1)
        elif seq_len < 1 or n % seq_len != 0:
            raise ValueError(f"seq_len={seq_len} must divide the number of tokens T={n}")
        else:
            seq = seq_len
        return RouterOutput(
            logits=logits,
            probs=scores,
            topk_index=top_i,
            topk_weight=top_w.to(x.dtype),
            losses={
                "seq_aux_loss": sequence_aux_loss(scores, top_i, n // seq, seq, token_mask),
            },
            score_fn="sigmoid",
        )

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free update (DeepSeek-V3 sec. 2.1.2): b += rate * sign(mean - load).

        ``load`` [E]: tokens (or assignments) per expert over the last step; overloaded
        experts lose bias, underloaded ones gain it. In place on the device, no host sync.
        """
        if load.shape != (self.num_experts,):
            raise ValueError(f"load must be [E={self.num_experts}], got {tuple(load.shape)}")
        load = load.to(self.e_score_correction_bias.device, torch.float32)
        delta = torch.sign(load.mean() - load) * self.bias_update_rate
        self.e_score_correction_bias.add_(delta.to(self.e_score_correction_bias.dtype))
