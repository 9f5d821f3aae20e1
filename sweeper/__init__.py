"""sweeper: plan, run (local, SLURM, Ray), collect and analyse learning-rate x batch-size x
token-budget sweeps of Scion-trained language models.

The command line is ``sweeper`` (:mod:`sweeper.cli`); the library entry points are
:func:`sweeper.spec.load_spec`, :func:`sweeper.plan.plan_sweep`, :class:`sweeper.store.SweepStore`
and :func:`sweeper.worker.run_trial`.
"""

from __future__ import annotations

__version__ = "0.1.0"
