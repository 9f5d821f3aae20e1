"""Regenerate the figures of docs/analysis.md from the synthetic surface.

Usage: ``python -m sweeper.analysis.docs_figures [OUT_DIR] [--keep SWEEP_DIR]`` (default
``docs/img``). With ``--keep results/synthetic-demo`` the synthetic sweep's tables and full analysis
stay there, so ``sweeper analyze synthetic-demo`` and ``sweeper refine synthetic-demo`` can be
tried on them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sweeper.analysis import synthetic
from sweeper.analysis.api import AnalysisOptions, analyze_tables
from sweeper.analysis.tables import load_sweep

FIGURES = (
    "loss_vs_lr_proxy.png",
    "fit_quality_proxy.png",
    "loss_surface_proxy.png",
    "norm_fit_proxy.png",
    "lr_law_proxy.png",
    "norm_growth_proxy.png",
    "batch_star.png",
    "norm_transfer.png",
)


def make(out_dir: Path, keep: Path | None = None) -> list[Path]:
    """Analyse a two-model synthetic sweep; copy the figures of :data:`FIGURES` to ``out_dir``."""
    h, m = synthetic.generate(
        synthetic.Surface(gamma=4.3, noise=0.01),
        models=("proxy", "wide"),
        lrs=synthetic.default_lrs(-11, 0, 0.5),
        batch_sizes=(8, 16, 32, 64, 128, 256),
        horizons=tuple(2**d for d in range(20, 26)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        sweep = keep or Path(tmp) / "synthetic-demo"
        sweep.mkdir(parents=True, exist_ok=True)
        synthetic.write_sweep_tables(sweep, h, m)
        result = analyze_tables(load_sweep(sweep), AnalysisOptions(title="synthetic-demo"))
        result.write(sweep / "analysis")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in FIGURES:
            shutil.copyfile(sweep / "analysis" / name, out_dir / name)
            written.append(out_dir / name)
    return written


def main() -> None:
    """Command-line entry: regenerate the figures into OUT_DIR."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="docs/img", type=Path)
    ap.add_argument("--keep", type=Path, default=None, help="Also keep the sweep tables here.")
    args = ap.parse_args()
    for p in make(args.out_dir, args.keep):
        print(p)


if __name__ == "__main__":
    main()
