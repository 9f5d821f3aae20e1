"""The ``[simulator]`` spec section: run the sweep on a simulated loss surface instead of training.

A spec with a ``[simulator]`` table plans the same runs as without it, but every run record carries
the surface in ``params["simulator"]`` (so it enters the run ids) and its command is
``python -m trainer.sim`` (see ``sweeper.plan``), which writes the real trainer's files instantly.
``backend = "sim"`` (``sweeper.backends.sim``) runs the same simulator in-process, for sweeps of
thousands of runs in seconds. The surface's parameters and their meaning: ``docs/simulator.md``::

    [simulator]
    seed = 1
    lr_b = 0.5          # log2 eta* = lr_b log2 B + lr_d log2 D + lr_c
    lr_d = -0.5
    lr_c = 3.0
    x0 = 7.0            # optimal log2 output norm
    noise = 0.2

The parameters are defined and validated once, by :class:`trainer.sim.Surface` (torch-free, like
``trainer.config``), so a spec is checked on any machine and the simulator reads the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sweeper.errors import SpecError
from trainer.config import ConfigError
from trainer.sim import Surface

SIM_MODULE = "trainer.sim"


@dataclass(frozen=True)
class SimulatorConfig:
    """A validated ``[simulator]`` section: the surface every run of the sweep is simulated on."""

    surface: Surface

    def run_params(self) -> dict[str, Any]:
        """The surface as the JSON dict the planner puts into ``params["simulator"]``."""
        return self.surface.to_dict()

    def log2_lr_star(self, batch_size: int, tokens: int) -> float:
        """The planted log2 eta*(B, D)."""
        return self.surface.log2_lr_star(batch_size, tokens)

    def log2_batch_star(self, tokens: int) -> float:
        """The planted log2 B*(D)."""
        return self.surface.log2_batch_star(tokens)


def parse_section(table: dict[str, Any], file: str) -> SimulatorConfig:
    """Validate ``[simulator]`` (every key optional; defaults in ``docs/simulator.md``).

    Raises:
        SpecError: an unknown key or a bad value, naming the file, key and value.
    """
    for key, value in table.items():
        if isinstance(value, dict | list):
            raise SpecError(file, f"simulator.{key}", value, "expected a number")
    try:
        return SimulatorConfig(Surface.from_dict(table))
    except ConfigError as e:
        raise SpecError(file, None, message=str(e)) from None
    except TypeError as e:  # a value of the wrong type reaching the dataclass
        raise SpecError(file, "simulator", message=str(e)) from None
