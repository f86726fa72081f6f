"""Settings of ``moescope params`` (the CLI is derived from :class:`ParamsOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

from moescope._cliopts import option
from moescope.cost.params import CostConfigError

__all__ = ["CONVENTION_HELP", "ParamsOptions"]

CONVENTION_HELP = {
    "both": "input embedding and output head counted",
    "head": "output head counted, input embedding not",
    "none": "neither embedding counted",
}


@dataclass
class ParamsOptions:
    """What ``moescope params`` counts and how it prints it (one field per flag)."""

    config: str = option(
        help="config.json, a model directory holding one (a save_pretrained directory, a "
        "saved TinyMoELM), or a moescope reference file with a 'config' key",
        positional=True,
    )
    embeddings: str = option(
        "both",
        help="which embedding matrices count as active: "
        + "; ".join(f"{k}: {v}" for k, v in CONVENTION_HELP.items()),
        choices=("both", "head", "none"),
    )
    seq_len: int | None = option(
        None,
        help="also report theoretical forward FLOPs per token at context length S",
        metavar="S",
    )
    attention: str | None = option(
        None,
        help="attention-score FLOPs: causal (mean keys over a causal sequence; the default "
        "with --seq-len) or full (S keys per token: Chinchilla, one decoding step at "
        "context S); needs --seq-len",
        choices=("causal", "full"),
    )
    top_k: int | None = option(None, help="override experts per token K", metavar="K")
    json: bool = option(False, help="print one JSON object instead of a table")

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len <= 0:
            raise CostConfigError(f"--seq-len must be a positive integer, got {self.seq_len}")
        if self.top_k is not None and self.top_k <= 0:
            raise CostConfigError(f"--top-k must be a positive integer, got {self.top_k}")
        if self.attention is not None and self.seq_len is None:
            raise CostConfigError(
                f"--attention {self.attention} sets how attention FLOPs are counted, which "
                "needs a context length; add --seq-len S"
            )
