"""Short display names for MoE layer paths (console tables, figures, ``Snapshot.summary``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["shorten_layer_names"]


def shorten_layer_names(names: Sequence[str]) -> tuple[list[str], str]:
    """Strip the dotted prefix and suffix all layer names share.

    ``["model.layers.0.mlp", "model.layers.1.mlp"]`` -> ``(["0", "1"], "model.layers.*.mlp")``.
    With one name, or when stripping would leave an empty name, the names are kept whole
    and the pattern is ``""``.
    """
    if len(names) < 2:
        return list(names), ""
    parts = [n.split(".") for n in names]
    shortest = min(len(p) for p in parts)
    pre = 0
    while pre < shortest and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while suf < shortest - pre and len({p[len(p) - 1 - suf] for p in parts}) == 1:
        suf += 1
    short = [".".join(p[pre : len(p) - suf]) for p in parts]
    if (pre == 0 and suf == 0) or any(not s for s in short):
        return list(names), ""
    pattern = ".".join([*parts[0][:pre], "*", *parts[0][len(parts[0]) - suf :]])
    return short, pattern
