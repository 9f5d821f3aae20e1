"""``python -m trainer --run RUN.json --out RUN_DIR``: train one run (also under torchrun).

``RUN.json`` is a bare :class:`~trainer.config.TrainConfig` dict or a sweeper run record whose
``"train"`` key holds one. Exit codes are ``trainer.config.EXIT_*``: 0 completed, 1 crash, 2 bad
config (one line on stderr, nothing written), 3 diverged, 75 checkpointed on SIGTERM/SIGUSR2 (run
the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrainConfig
from trainer.schema import EXIT_BY_STATUS, EXIT_CONFIG, Status


def load_run_config(path: Path) -> TrainConfig:
    """Read ``RUN.json`` (bare config or a record with a ``"train"`` key) and validate it.

    Raises:
        ConfigError: Unreadable file, bad JSON, or a bad key or value (named in the message).
    """
    try:
        raw: Any = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = raw["train"]
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a JSON object (a TrainConfig or a record with 'train')"
        )
    try:
        return TrainConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if "RANK" in os.environ and rank else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, and map the summary's status to the exit code."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="RUN.json")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    _setup_logging()
    try:
        cfg = load_run_config(args.run)
        from trainer.train import train  # torch is imported only once the config is known good

        summary = train(cfg, args.out)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_BY_STATUS[Status(summary["status"])]


if __name__ == "__main__":
    sys.exit(main())
