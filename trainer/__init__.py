"""The trainer: one Scion-trained Llama-style LM run per process group.

``trainer.config`` is torch-free and is the only module the sweeper imports; the training entry
point is ``trainer.train.train(cfg, out_dir)`` (``python -m trainer`` from the command line).
"""

from __future__ import annotations

from trainer.config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig"]
