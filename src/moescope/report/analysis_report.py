"""Render an :class:`~moescope.analysis.result.AnalysisResult` as ``report.html`` + PNGs.

Rendering only: every number shown is read from the result (computed by
:mod:`moescope.analysis.run`); nothing here computes a statistic. :func:`render_report`
draws each figure (a figure that fails is listed under "Problems", the rest of the report
is still written), saves it as ``<name>.png`` in the output directory and embeds it in one
self-contained page (:mod:`moescope.report.html`). Numbers go through
:func:`moescope.report.fmt.fmt_number`; every text is HTML-escaped once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moescope import __version__
from moescope.plots import usage_heatmap
from moescope.report import analysis_plots as AP
from moescope.report import html as H
from moescope.report.fmt import fmt_number, visible
from moescope.report.verdict import alerts_table, short_layer_labels, verdict_section

if TYPE_CHECKING:
    from moescope.analysis.result import AnalysisResult
    from moescope.analysis.verdict import Verdict

__all__ = ["FigureSet", "WriteBytes", "WriteText", "figure_png", "render_report"]

#: ``write_bytes(out_dir, name, data) -> path`` (the report never opens files itself).
WriteBytes = Callable[[Path, str, bytes], Path]
#: ``write_text(out_dir, name, text) -> path``.
WriteText = Callable[[Path, str, str], Path]


def figure_png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure at its own size and dpi (no tight cropping)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


class FigureSet:
    """Draws, saves and embeds figures; a failing one becomes a problem line."""

    def __init__(self, out_dir: Path, write_bytes: WriteBytes) -> None:
        self.out_dir = out_dir
        self.write_bytes = write_bytes
        self.saved: dict[str, Path] = {}
        self.errors: list[str] = []

    def embed(
        self, name: str, make: Callable[[], Any], alt: str, caption: str | None = None
    ) -> str:
        try:
            png = figure_png(make())
        except Exception as err:  # one failing figure must not lose the whole report
            self.errors.append(f"figure {name}: {type(err).__name__}: {err}")
            return ""
        self.saved[name] = self.write_bytes(self.out_dir, f"{name}.png", png)
        return H.image(png, alt, caption)


def render_report(
    result: AnalysisResult,
    out_dir: str | Path,
    *,
    verdict: Verdict,
    write_bytes: WriteBytes,
    write_text: WriteText,
) -> Path:
    """Write the figures and ``report.html`` of ``result`` into ``out_dir`` with the
    given writers; the page opens with ``verdict`` (what is wrong, where, the fix) (``moescope.analysis.render`` passes the safe writers of
    :mod:`moescope.analysis.outdir`); returns the report path."""
    out = Path(out_dir)
    figs = FigureSet(out, write_bytes)
    short = _short(result)
    lead = [verdict_section(verdict, short)]
    sections = [
        _overview(result),
        _alerts(result, verdict, short),
        _usage(result, figs),
        _entropy(result, figs),
        _coactivation(result, figs),
    ]
    if result.snapshot.has_neurons:
        sections.append(_neurons(result, figs))
    sections.append(_parameters(result, figs))
    sections.extend(_routing_sections(result, figs))
    problems = list(figs.errors) + (list(result.routing.errors) if result.routing else [])
    if problems:
        sections.append(
            H.Section("problems", "Problems").add(
                H.paragraph("Some parts of the report could not be produced:"),
                "<ul>" + "".join(f"<li>{H.escape(e)}</li>" for e in problems) + "</ul>",
            )
        )
    m = result.model
    preamble = []
    if result.partial:
        preamble.append(
            H.paragraph(
                f"Partial report: the run was interrupted after {result.total_tokens:,} tokens; "
                "every number below covers those tokens only.",
                "banner partial",
            )
        )
    if m.random_weights:
        preamble.append(
            H.paragraph(
                "This model has random weights (built from a config, not trained): "
                + m.description,
                "banner random",
            )
        )
    for note in result.notes:
        if not note.startswith("interrupted:"):
            preamble.append(H.paragraph(note, "banner note"))
    title = f"moescope analysis: {model_title(m.class_name, m.model_type)}"
    subtitle = (
        f"{_source_tail(m.source)}, {result.total_tokens:,} tokens from "
        + ", ".join(d.label for d in result.domains)
        + (" (partial)" if result.partial else "")
        + (" - random weights" if m.random_weights else "")
    )
    document = H.page(
        title,
        sections,
        subtitle=subtitle,
        preamble=preamble,
        lead=lead,
        footer=f"moescope {__version__}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    return write_text(out, "report.html", document)


# --------------------------------------------------------------------------- sections


def _overview(r: AnalysisResult) -> H.Section:
    snap, m, s = r.snapshot, r.model, r.settings
    batching = f"{s['batch_size']:,} rows x {s['seq_len']:,} tokens"
    if r.rows_per_forward and r.rows_per_forward < s["batch_size"]:
        batching += f" (forwards of {r.rows_per_forward:,} rows: memory budget)"
    if s.get("max_tokens"):
        batching += f", at most {s['max_tokens']:,} tokens per input"
    sec = H.Section("overview", "Overview")
    sec.add(
        H.key_values(
            [
                ("model", m.source),
                ("architecture", f"{m.model_type} ({m.class_name})"),
                (
                    "weights",
                    "random weights (untrained)" if m.random_weights else "loaded from checkpoint",
                ),
                ("tokenizer", m.tokenizer),
                ("device / dtype", f"{m.device} / {m.dtype}"),
                (
                    "MoE layers",
                    f"{len(snap.layers)} (experts per layer: "
                    f"{', '.join(str(e) for e in sorted({x.num_experts for x in snap.layers.values()}))}"
                    f"; top-k: {', '.join(str(k) for k in sorted({x.top_k for x in snap.layers.values()}))})",
                ),
                (
                    "tokens analysed",
                    f"{snap.total_tokens:,}" + (" (partial run)" if r.partial else ""),
                ),
                ("batching", batching),
                ("processes", str(r.world_size)),
                ("neurons", r.threshold_label or "not tracked (add --neurons)"),
                ("time", f"{r.seconds:.1f} s"),
            ]
        )
    )
    sec.add(
        "<h3>Data</h3>",
        H.table(
            ["label", "source", "tokens", "forwards"],
            [[d.label, d.path, fmt_number(d.tokens), fmt_number(d.batches)] for d in r.domains],
            left=2,
        ),
    )
    sec.add(
        "<h3>Model-level aggregates</h3>",
        H.table(
            ["metric", "value"],
            [[k.replace("_", " "), fmt_number(v)] for k, v in snap.aggregates().items()],
        ),
    )
    return sec


def _short(r: AnalysisResult) -> dict[str, str]:
    return short_layer_labels(list(r.snapshot.layers))


def model_title(class_name: str, model_type: str) -> str:
    """``"TinyMoEForCausalLM (moescope_tiny_moe)"``: what the model is, not its folder."""
    if class_name and model_type and model_type.lower() not in class_name.lower():
        return f"{class_name} ({model_type})"
    return class_name or model_type or "model"


def _source_tail(source: str) -> str:
    """The last two components of a path (``no_balance/checkpoint``), or a hub id."""
    parts = [p for p in str(source).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(source)


def _alerts(r: AnalysisResult, verdict: Verdict, short: dict[str, str]) -> H.Section:
    sec = H.Section("alerts", f"Alerts ({len(r.alerts):,})")
    if r.alerts:
        sec.add(
            H.paragraph(
                "Grouped by rule (the fix for each is in the verdict above); every alert "
                "is in summary.json."
            ),
            alerts_table(verdict, short),
        )
    else:
        sec.add(H.paragraph("No alert fired. Checked: " + "; ".join(verdict.checked) + "."))
    return sec


def _usage(r: AnalysisResult, figs: FigureSet) -> H.Section:
    snap = r.snapshot
    sec = H.Section("usage", "Expert usage")
    sec.add(
        figs.embed(
            "usage_heatmap",
            lambda: usage_heatmap(snap, value="load", title="Expert load per layer (1 = uniform)"),
            "layer x expert usage heatmap",
            "Load = usage fraction x E; 1 is what a perfectly balanced router gives.",
        )
    )
    sec.add(
        figs.embed(
            "usage_distribution",
            lambda: AP.usage_distribution_figure(snap),
            "usage distribution per layer",
            "Each layer's experts sorted from the busiest to the idlest.",
        )
    )
    rows = [
        [
            name,
            fmt_number(s.num_tokens),
            f"{fmt_number(s.active_experts)} / {s.num_experts}",
            fmt_number(s.cv),
            fmt_number(s.max_over_mean),
            fmt_number(s.routing_entropy_norm),
            fmt_number(s.load_entropy_norm),
            fmt_number(s.top1_prob),
            fmt_number(s.aux_loss),
            fmt_number(s.unique_experts_per_batch),
        ]
        for name, s in snap.layers.items()
    ]
    sec.add(
        H.table(
            [
                "layer",
                "tokens",
                "active experts",
                "cv",
                "max/mean",
                "routing entropy (norm)",
                "load entropy (norm)",
                "top-1 prob",
                "aux loss",
                "experts per forward",
            ],
            rows,
        )
    )
    return sec


def _entropy(r: AnalysisResult, figs: FigureSet) -> H.Section:
    sec = H.Section("entropy", "Routing entropy and balance")
    sec.add(
        figs.embed(
            "entropy_cv",
            lambda: AP.entropy_cv_figure(r.snapshot),
            "routing entropy and cv per layer",
            "Normalised entropies (1 = uniform) and the coefficient of variation "
            "of usage counts (0 = balanced).",
        )
    )
    return sec


def _coactivation(r: AnalysisResult, figs: FigureSet) -> H.Section:
    sec = H.Section("coactivation", "Co-activation")
    sec.add(
        figs.embed(
            "coactivation",
            lambda: AP.coactivation_figure(r.snapshot, r.coact_layer),
            f"co-activation of {r.coact_layer}",
            "Fraction of tokens that chose both experts (choose the layer with --coact-layer).",
        )
    )
    return sec


def _neurons(r: AnalysisResult, figs: FigureSet) -> H.Section:
    snap = r.snapshot
    sec = H.Section("neurons", "Neurons")
    sec.add(
        H.paragraph(
            f"Threshold: {r.threshold_label}. A neuron is activated for a "
            "(token, slot) when |act(gate(x)) * up(x)| exceeds it."
        )
    )
    sec.add(
        figs.embed(
            "neuron_sparsity",
            lambda: AP.neuron_sparsity_figure(snap),
            "neuron sparsity per layer and expert",
        )
    )
    sec.add(
        figs.embed(
            "dead_neurons",
            lambda: AP.dead_neurons_figure(snap),
            "dead neurons per layer and expert",
        )
    )
    rows = [
        [
            name,
            fmt_number(s.intermediate_size),
            fmt_number(s.neuron_rows),
            fmt_number(s.activated_neurons_mean),
            fmt_number(s.activated_neurons_std),
            fmt_number(s.neuron_sparsity),
            fmt_number(s.dead_neurons),
        ]
        for name, s in snap.layers.items()
        if s.has_neurons
    ]
    sec.add(
        H.table(
            ["layer", "I", "rows", "activated mean", "activated std", "sparsity", "dead neurons"],
            rows,
        )
    )
    return sec


_CONVENTION = {
    "both": "input embedding and output head counted",
    "head": "output head counted, input embedding not",
    "none": "neither embedding counted",
}


def _parameters(r: AnalysisResult, figs: FigureSet) -> H.Section:
    sec = H.Section("parameters", "Parameters and FLOPs")
    p, f, m = r.params, r.flops, r.measured
    if p is None:
        return sec.add(H.paragraph(f"Parameter counting failed: {r.cost_error}", "banner note"))
    tied = " The head is tied to the input embedding (counted once)." if p.tied_embeddings else ""
    sec.add(
        H.paragraph(
            f"Embedding convention: {p.embeddings} ({_CONVENTION[p.embeddings]}; "
            f"change with --embeddings).{tied}"
        )
    )
    if p.active_path != "token":
        towers = ", ".join(f"{t} {fmt_number(n)}" for t, n in p.towers.items())
        sec.add(
            H.paragraph(
                f"Active parameters are those of a {p.active_path}: the total counts every "
                f"tower ({towers}); the non-text towers are not active for text."
            )
        )
    rows = [
        ["total parameters", fmt_number(p.total_params), "-"],
        [
            "active parameters per token",
            fmt_number(p.active_params),
            fmt_number(m.measured_active_params) if m else "-",
        ],
        [
            "activation ratio",
            fmt_number(p.activation_ratio),
            fmt_number(m.measured_activation_ratio) if m else "-",
        ],
    ]
    if f is not None:
        rows.append(
            [f"forward FLOPs per token (seq_len {f.seq_len:,})", fmt_number(f.flops_per_token), "-"]
        )
        rows.append(
            [
                "matmul FLOPs per token",
                fmt_number(f.matmul_flops),
                fmt_number(m.measured_matmul_flops)
                if m and m.measured_matmul_flops is not None
                else "-",
            ]
        )
    if m is not None and m.skippable_down_flops is not None:
        rows.append(
            ["down-projection FLOPs of inactive neurons", "-", fmt_number(m.skippable_down_flops)]
        )
        rows.append(
            [
                "computation ratio (measured / theoretical matmul)",
                "-",
                fmt_number(m.computation_ratio),
            ]
        )
    sec.add(H.table(["quantity", "theoretical", "measured (this data)"], rows))
    values = {"total": float(p.total_params), "active (theoretical)": float(p.active_params)}
    if m is not None:
        values["active (measured)"] = float(m.measured_active_params)
    sec.add(
        figs.embed(
            "parameters",
            lambda: AP.params_figure(values, f"Parameters (embeddings convention: {p.embeddings})"),
            "total and active parameters",
        )
    )
    sec.add(
        H.table(
            ["category", "total", "active"],
            [
                [k, fmt_number(v), fmt_number(p.active_breakdown.get(k))]
                for k, v in p.breakdown.items()
            ],
        )
    )
    return sec


def _token_cell(tokens: list[Any]) -> str:
    """Top tokens as ``<code>`` chips: the visible text escaped once, count and share."""
    return " ".join(
        f'<span class="tok"><code>{H.escape(visible(t.token))}</code> '
        f"{t.count:,} ({t.share:.0%})</span>"
        for t in tokens
    )


def _routing_sections(r: AnalysisResult, figs: FigureSet) -> list[H.Section]:
    # why: routing_analysis imports moescope.stats (its __init__ imports torch); this module stays torch-free
    from moescope.report import routing_analysis as RA

    ra = r.routing
    if ra is None:
        return []
    out: list[H.Section] = []
    if ra.divergence is not None and ra.distributions:
        div = ra.divergence
        sec = H.Section("domains", "Routing per domain")
        sec.add(
            figs.embed(
                "domain_distribution",
                lambda: RA.domain_distribution_figure(ra.distributions),
                "expert assignment per domain",
                "Share of assignments per expert and domain (Mixtral, Fig. 7); "
                "dashed: uniform 1/E.",
            )
        )
        sec.add(
            figs.embed(
                "domain_divergence",
                lambda: RA.divergence_figure(div),
                "divergence between domains",
                "Jensen-Shannon divergence of the expert distributions between "
                "domains, in nats (0 = same routing; at most ln 2 = 0.693).",
            )
        )
        sec.add(
            H.table(
                ["layer", "mean JS (nats)", "max JS (nats)"],
                [[lay, fmt_number(div.mean[lay]), fmt_number(div.max[lay])] for lay in div.layers],
            )
        )
        out.append(sec)
    if ra.same_expert:
        rates = ra.same_expert
        sec = H.Section("repetition", "Consecutive tokens")
        sec.add(
            figs.embed(
                "same_expert",
                lambda: RA.same_expert_figure(
                    rates if len(rates) > 1 else next(iter(rates.values()))
                ),
                "consecutive tokens sharing an expert",
                "How often token t+1 has the same first-choice expert as token t (Mixtral, "
                "Table 5), against chance.",
            )
        )
        out.append(sec)
    if ra.passage is not None:
        p = ra.passage
        sec = H.Section("tokens", f"Tokens coloured by expert ({p.layer})")
        sec.add(
            H.paragraph(
                f"First-choice expert of each token at {p.layer}, from the start of {p.domain!r} "
                "(whole lines; change the layer with --token-layer). The model saw the text in "
                f"rows of {r.settings['seq_len']:,} tokens."
            )
        )
        sec.add(RA.colored_tokens_html(p.tokens, p.experts, p.num_experts))
        out.append(sec)
    if ra.top_tokens:
        sec = H.Section("specialisation", f"Expert specialisation ({ra.token_layer})")
        sec.add(
            H.paragraph(
                "The tokens each expert receives most often (any slot), with how "
                "many times and the share of that token's occurrences sent to the "
                "expert. Spaces show as \u2423, newlines as \\n."
            )
        )
        for d, tops in ra.top_tokens.items():
            rows = [
                [str(e), fmt_number(sum(t.count for t in v)), _token_cell(v)]
                for e, v in tops.items()
            ]
            sec.add(
                f"<h3>{H.escape(d)}</h3>",
                H.table(
                    ["expert", "count (top tokens)", "top tokens"], rows, left=3, raw_columns=[2]
                ),
            )
        out.append(sec)
    if ra.agreement is not None:
        agree, chance = ra.agreement, ra.agreement_chance
        sec = H.Section("agreement", "Router agreement")
        sec.add(
            figs.embed(
                "router_agreement",
                lambda: RA.agreement_figure(
                    agree, chance=chance, title=f"Router agreement with {ra.compare_source}"
                ),
                "router agreement per layer",
                "Mean |top-k(A) \u2229 top-k(B)| / K on the same tokens (OLMoE); dashed: "
                "independent random routers.",
            )
        )
        sec.add(H.table(["layer", "agreement"], [[lay, fmt_number(v)] for lay, v in agree.items()]))
        out.append(sec)
    return out
