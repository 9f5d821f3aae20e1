"""Figures and report sections of the width analysis (:mod:`sweeper.analysis.width`) and the
schedule law (:mod:`sweeper.analysis.schedule_law`). Each figure function returns PNG bytes; each
section function renders the analysis's ``fits.json`` entry as HTML."""

from __future__ import annotations

import html
import re
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis import schedule_law as sl
from sweeper.analysis import width as wa
from sweeper.analysis.plots import _panels, _png

# -------------------------------------------------------------------------------------- width


def width_figure(w: wa.WidthAnalysis, batch_size: int, tokens: int) -> bytes:
    """log2 eta*_group against log2 width, one panel per group, one colour per optimizer."""
    fig, axes = _panels(3, ncols=3, size=3.8)
    o = w.optima[(w.optima["batch_size"] == batch_size) & (w.optima["tokens"] == tokens)]
    e = w.exponents[(w.exponents["batch_size"] == batch_size) & (w.exponents["tokens"] == tokens)]
    marks = dict(zip(sorted(o["optimizer"].unique()), "osD^v", strict=False))
    for ax, g in zip(axes, wa.GROUPS, strict=True):
        for (opt, fam), d in o[o["group"] == g].groupby(["optimizer", "family"]):
            d = d.sort_values("width")
            lw = np.log2(d["width"].to_numpy(float))
            ok = (d["status"] == "ok").to_numpy()
            col = ax.plot(lw[ok], d["log2_eta_star"][ok], marks.get(opt, "o"),
                          label=f"{opt} {fam}")[0].get_color()  # fmt: skip
            ax.plot(lw[~ok], d["log2_eta_argmin"][~ok], marks.get(opt, "o"), mfc="none",
                    color=col)  # fmt: skip
            f = e[(e["group"] == g) & (e["optimizer"] == opt) & (e["family"] == fam)]
            if len(f) and bool(f["identified"].iloc[0]):
                r = f.iloc[0]
                ax.plot(lw, r["intercept"] - r["c"] * lw, "-", color=col, lw=1,
                        label=f"c = {r['c']:.2f} [{r['c_lo']:.2f}, {r['c_hi']:.2f}]")  # fmt: skip
        ax.set_title(f"group {g}", fontsize=9)
        ax.set_xlabel("log2 width")
        ax.set_ylabel(f"log2 eta*_{g}")
        ax.legend(fontsize=6)
    fig.suptitle(f"Optimal per-group rate against width (B = {batch_size}, D = {tokens}); "
                 "open: not bracketed (argmin)", fontsize=9)  # fmt: skip
    return _png(fig)


def width_figures(w: wa.WidthAnalysis) -> list[tuple[str, str, bytes]]:
    """``(file name, heading, png)`` per (B, D)."""
    out = []
    for (b, d), _ in w.optima.groupby(["batch_size", "tokens"], sort=True):
        out.append((f"width_B{int(b)}_D{int(d)}.png",
                    f"Optimal rate of each layer group against width (B = {b}, D = {d})",
                    width_figure(w, int(b), int(d))))  # fmt: skip
    return out


def width_section(doc: dict[str, Any]) -> str:
    """The report's width section: exponents against the prescriptions."""
    e = pd.DataFrame(doc["exponents"])
    parts = [
        "<h2>Learning-rate exponents across width</h2>",
        "<p>Per optimizer and layer group: log2 eta*<sub>group</sub> = const - c log2 width "
        "(Everett et al. 2024), eta* the vertex of a parabola in log2 eta<sub>group</sub> on the "
        "group's scan at each width (others held); OLS over widths with a t 95 % interval. "
        "Prescribed c: SP (one rate, not scaled), muP for Adam (no output multiplier), Scion "
        "(width-independent by its norms).</p>",
    ]
    if e.empty:
        return "\n".join(parts)
    shown = pd.DataFrame({
        "optimizer": e["optimizer"], "family": e["family"], "B": e["batch_size"],
        "D": e["tokens"], "group": e["group"], "widths": e["widths"],
        "c [95 % CI]": [f"{c:.3f} [{lo:.3f}, {hi:.3f}]" if ok else "-" for c, lo, hi, ok in
                        zip(e["c"], e["c_lo"], e["c_hi"], e["identified"], strict=True)],
        **{name: e[name] for name in wa.PRESCRIPTIONS},
        "inside the CI": e["consistent_with"], "left out": e["left_out"],
    })  # fmt: skip
    parts.append(shown.to_html(index=False, float_format="%.3g", na_rep="-"))
    return "\n".join(p if p.startswith("<") else html.escape(p) for p in parts)


# ------------------------------------------------------------------------------- schedule law


def schedule_figure(g: sl.GroupFit) -> bytes:
    """Loss against step per run (observed, with the law: solid fitted, dashed held out) and the
    rates, for one group."""
    fig, (ax, ax_lr) = _panels(2, ncols=2, size=4.6)
    colours = _colours(len(g.curves))
    for c, col in zip(sorted(g.curves, key=lambda c: (c.label, c.final_step)), colours,
                      strict=True):  # fmt: skip
        ax.plot(c.steps, c.loss, ".", ms=2, alpha=0.35, color=col)
        if g.identified:
            st = np.arange(1, c.final_step + 1)
            pred = sl.predict_curve(g.coef, g.lam, c.eta)[st]
            tag = "fit" if c.fitted else "held out"
            ax.plot(st, pred, "-" if c.fitted else "--", lw=1.3, color=col,
                    label=f"{c.label} T={c.final_step} ({tag})")  # fmt: skip
        ax_lr.plot(np.arange(len(c.eta)), c.eta, color=col, lw=1.2)
    lo = min(float(np.percentile(c.loss, 1)) for c in g.curves)
    hi = max(float(np.percentile(c.loss, 60)) for c in g.curves)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.3 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    k = g.key
    ax.set_title(f"{k['model']} B={k['batch_size']} lr={k['lr']:.3g}: law fit", fontsize=9)
    ax.legend(fontsize=6)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate (logged)")
    ax_lr.set_title(f"schedules (lam = {g.lam:g})", fontsize=9)
    return _png(fig)


def _colours(n: int) -> list[Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def schedule_figures(res: sl.ScheduleLaw) -> list[tuple[str, str, bytes]]:
    """``(file name, heading, png)`` per fitted group."""
    out = []
    for g in res.groups:
        if not g.curves:
            continue
        k = g.key
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{k['model']}_B{k['batch_size']}_lr{k['lr']:.4g}")
        head = (f"Schedule law: loss against step, law fitted on "
                f"{', '.join(sorted({c.label for c in g.curves if c.fitted})) or 'nothing'} "
                f"({k['model']}, B = {k['batch_size']}, lr = {k['lr']:.4g})")  # fmt: skip
        out.append((f"schedule_law_{slug}.png", head, schedule_figure(g)))
    return out


def schedule_section(doc: dict[str, Any]) -> str:
    """The report's schedule-law section from the ``schedule_law`` document."""
    fits = pd.DataFrame(doc["fits"])
    parts = [
        "<h2>Schedule law</h2>",
        "<p>L(s) = L0 + A S1(s)<sup>-alpha</sup> - C S2(s) (Tissue et al. 2024): S1 the sum of the "
        "rates so far, S2 the annealing area with decay lam. Fitted per (model, layout, B, peak "
        "rate) on every logged step of the fitted schedules (steps before "
        f"{doc['options']['fit_from']:g} of the longest run left out); 95 % intervals from a "
        "moving-block residual bootstrap, given lam.</p>",
    ]
    if not fits.empty:
        cols = [*sl.GROUP_KEYS, "fitted_schedules", "n_points", "lam", *sl.PARAMS, "rmse"]
        show = fits[cols].copy()
        for p in sl.PARAMS:
            show[p] = [
                f"{v:.4g} [{lo:.4g}, {hi:.4g}]"
                for v, lo, hi in zip(fits[p], fits[f"{p}_lo"], fits[f"{p}_hi"], strict=True)
            ]
        parts.append(show.to_html(index=False, float_format="%.4g", na_rep="-"))
    pred = pd.DataFrame(doc["predictions"])
    if not pred.empty:
        cols = ["model", "batch_size", "lr", "schedule", "fitted", "final_step", "final_obs",
                "final_pred", "final_pred_lo", "final_pred_hi", "rel_error", "rmse"]  # fmt: skip
        s = doc["held_out_summary"]
        if s["held_out_runs"]:
            parts.append(f"<p>Held-out runs: {s['held_out_runs']}, mean |relative error| of the "
                         f"final loss {100 * s['mean_abs_rel_error']:.2f} % (max "
                         f"{100 * s['max_abs_rel_error']:.2f} %).</p>")  # fmt: skip
        parts.append("<h3>Final loss: predicted against observed</h3>")
        parts.append(pred.sort_values(["fitted", "final_step"])[cols].to_html(
            index=False, float_format="%.4g", na_rep="-"))  # fmt: skip
    tables = (
        ("rank_agreement", "Rank agreement per horizon"),
        ("ranking", "Candidate schedules ranked by predicted final loss"),
    )
    for name, title in tables:
        t = pd.DataFrame(doc[name])
        if not t.empty:
            parts += [f"<h3>{html.escape(title)}</h3>", t.to_html(index=False, float_format="%.4g")]
    return "\n".join(parts)
