"""The ``sweeper`` command line: thin adapters over the library API (:mod:`sweeper`).

Every command is a few lines over :class:`sweeper.Sweep`; :func:`main` is the one place that turns
a :class:`sweeper.SweepError` (or a bad config) into ``error: <one line>`` and exit status 2, and
Ctrl-C into exit status 130.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sweeper import SweepError

# Command modules, imported on first use (the analysis imports pandas; `status` must not).
COMMANDS = {
    "plan": "sweeper.cli.runs:plan_cmd",
    "launch": "sweeper.cli.runs:launch_cmd",
    "resume": "sweeper.cli.runs:resume_cmd",
    "status": "sweeper.cli.status:status_cmd",
    "logs": "sweeper.cli.status:logs_cmd",
    "cancel": "sweeper.cli.runs:cancel_cmd",
    "calibrate": "sweeper.cli.runs:calibrate_cmd",
    "collect": "sweeper.cli.tables:collect_cmd",
    "export": "sweeper.cli.tables:export_cmd",
    "analyze": "sweeper.cli.analysis:analyze",
    "refine": "sweeper.cli.analysis:refine",
    "autopilot": "sweeper.cli.autopilot:autopilot_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--results",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory holding the sweeps (default: results; SWEEP may be a name under it).",
)
@click.version_option(package_name="sweeper")
def cli(results: str | None) -> None:
    """Plan, run and collect (lr, B, D) sweeps of Scion-trained LMs.

    \b
    Example:
      sweeper plan sweeps/demo.toml
      sweeper launch sweeps/demo.toml --max-parallel 2
      sweeper status demo
    """


def results_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--results`` after the subcommand too (it wins over one given before)."""
    return click.option(
        "--results",
        "results_here",
        type=click.Path(file_okay=False),
        default=None,
        help="Directory holding the sweeps (default: results).",
    )(fn)


def results_dir(ctx: click.Context, here: str | None) -> Path:
    """The effective ``--results``: after the subcommand, else before it, else ``results``."""
    return Path(here or ctx.find_root().params.get("results") or "results")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning errors into one-line messages."""
    from trainer.config import ConfigError

    try:
        code = cli.main(args=argv, prog_name="sweeper", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code if e.exit_code != 1 else 2)
    except (SweepError, ConfigError) as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = ["COMMANDS", "cli", "main", "results_dir", "results_option"]
