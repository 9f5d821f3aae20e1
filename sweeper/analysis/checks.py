"""The warnings of an analysis, each naming the slice, horizon or series it is about.

They cover: optima not bracketed by the slice's own rates (censored from the laws), vertices outside
the fitted points, slices without an optimum, B* on the edge of the batch grid, laws that are not
identified, fits whose optimum lies below every observation by more than the noise, and input
problems (no loss at initialisation, no per-step metrics for the smoothing window).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from sweeper.analysis.smoothing import SRC_COL, SmoothOptions


def slice_name(model: str, layout: str, tokens: float | None = None, batch: Any = None) -> str:
    """``"proxy D=2^18 B=8"`` (with ``layout ...`` when it is not the default ``1:1:1``)."""
    parts = [str(model)]
    if layout != "1:1:1":
        parts.append(f"layout {layout}")
    if tokens is not None:
        parts.append(f"D=2^{math.log2(float(tokens)):g}")
    if batch is not None:
        parts.append(f"B={int(batch)}")
    return " ".join(parts)


def slice_warnings(optima: pd.DataFrame, c_text: str, gap_sigmas: float) -> list[str]:
    """One warning per slice and problem: edge, vertex outside, no optimum, fit below the data."""
    out = []
    for r in optima.itertuples():
        name = slice_name(r.model, r.layout, r.tokens, r.batch_size)
        if r.status == "not_convex":
            out.append(f"{name}: no optimum, the fitted parabola is not convex")
        elif r.status in ("too_few_points", "no_points"):
            out.append(f"{name}: no optimum, {r.n_valid} usable point(s) (3 needed)")
        if r.edge:
            side = "highest" if r.edge == "high" else "lowest"
            out.append(
                f"{name}: best rate 2^{r.log2_lr_argmin:g} is the slice's {side} usable rate, so "
                f"eta* is not bracketed (censored from the laws; `sweeper refine` proposes rates "
                f"{'above' if r.edge == 'high' else 'below'})"
            )
        elif r.status == "ok" and r.vertex_outside:
            out.append(
                f"{name}: the vertex x0 = {r.x0:.2f} lies outside the fitted points "
                f"(x {r.x_fit_lo:.2f}..{r.x_fit_hi:.2f}); eta* censored from the laws"
            )
        if r.below_data:
            out.append(
                f"{name}: the fitted optimum y0 = {r.y0:.4g} lies {r.gap:.3g} below the lowest "
                f"fitted loss, more than the grid allowance {r.gap_allowance:.2g} plus "
                f"{gap_sigmas:g} x the noise {r.noise:.2g}: the parabola does not fit these points "
                f"({c_text})"
            )
    return out


def batch_warnings(bstar: pd.DataFrame) -> list[str]:
    """One warning per horizon whose B* is on the edge of the batch grid."""
    out = []
    for r in bstar[bstar["edge_batch"] != ""].itertuples():
        out.append(
            f"{slice_name(r.model, r.layout, r.tokens)}: {r.censored}, so the optimum may lie "
            "beyond it (censored from the B* law)"
        )
    return out


_SOURCE_TEXT = {
    "log2_lr_star": "the eta* law on grid-rounded eta* (the paper's)",
    "log2_lr_star_interp": "the eta* law on interpolated eta*",
    "log2_B_star": "the B* law on the argmin B* (the paper's)",
    "log2_B_star_interp": "the B* law on the refined B*",
}


def law_warnings(fits: dict[str, Any], n_models: int) -> list[str]:
    """One warning per law that is not identified, naming the series and the law."""
    out = []
    # With one model the pooled fit is the per-model fit again: do not warn twice.
    pooled = fits["pooled"] if n_models > 1 else []
    for s in fits["series"] + pooled:
        series = slice_name(s["model"] if s["model"] != "*" else "all models", s["layout"])
        for key in ("lr_law", "lr_law_alt", "batch_law", "batch_law_alt"):
            fit = s[key]
            head = s[key.replace("_alt", "")]
            if fit["identified"] or (key.endswith("_alt") and not head["identified"]):
                continue  # identified, or the headline's warning says why already
            label = _SOURCE_TEXT.get(fit.get("eta_source") or fit.get("b_source"), key)
            if not key.endswith("_alt"):
                label = label.replace("the ", "the headline ", 1)
            out.append(f"{series}: {label} is not identified: {fit['reason']}")
    return out


def input_warnings(
    smoothed: pd.DataFrame,
    smooth: SmoothOptions,
    loss: str,
    c_fixed: float | None,
    has_metrics: bool,
) -> list[str]:
    """Warnings about the input: the intercept, the metrics table, the smoothing window."""
    out = []
    if c_fixed is None:
        out.append("intercept c fitted freely, not at the initial loss (--free-c or no step 0)")
    if not has_metrics:
        out.append("no per-step metrics table: the norm-growth figure is missing")
    if smooth.enabled and loss == "train_loss" and SRC_COL in smoothed.columns:
        raw = smoothed[smoothed[SRC_COL] == "raw"]
        wanted = pd.Series(True, index=raw.index)
        if smooth.average_tokens is not None:
            wanted &= raw["tokens"].isin(set(smooth.average_tokens))
        if smooth.average_batch is not None:
            wanted &= raw["batch_size"].isin(set(smooth.average_batch))
        missing = raw[wanted]
        if len(missing):
            r = missing.iloc[0]
            out.append(
                f"{len(missing)} point(s) not smoothed: their step is not in the per-step metrics "
                f"and the table has no window for them (e.g. run {r['run_id']} at "
                f"D=2^{math.log2(float(r['tokens'])):g})"
            )
    return out
