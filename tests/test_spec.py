"""Spec validation: every malformed spec is one clear line naming file, key and value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sweeper.errors import SpecError
from sweeper.plan import plan_sweep
from sweeper.spec import Resources, load_spec, parse_spec_text

REPO = Path(__file__).resolve().parents[1]

BASE = """
name = "t"
[[models]]
preset = "test-micro"
[grid]
lr = [0.01, 0.02]
batch_size = [4, 8]
horizons_tokens = [1024, 2048]
"""


def spec_with(extra: str = "", base: str = BASE) -> str:
    return base + "\n" + extra


def test_minimal_spec_defaults() -> None:
    s = parse_spec_text(BASE, "t.toml")
    assert s.name == "t" and s.models[0].name == "test-micro"
    assert s.grid.seeds == (30,) and s.grid.lr_scales == ((1.0, 1.0, 1.0),)
    assert s.resources == Resources() and s.backend.name == "local"
    assert s.schedule.kind == "constant" and s.window is None


def test_full_spec_parses() -> None:
    text = BASE.replace("lr = [0.01, 0.02]", "lr = {log2_from = -8, log2_to = -4, log2_step = 0.5}")
    text = text.replace("horizons_tokens = [1024, 2048]", "log2_horizons = [10, 11]")
    text += """
seeds = [30, 3034]
lr_scales = [[1, 0.125, 1], [1, 1, 1]]
[[models]]
name = "wide"
preset = "test-micro"
d_model = 64
[data]
kind = "synthetic"
[optim]
momentum = 0.9
[schedule]
kind = "wsd"
decay_fraction = 0.25
[window]
a = 0.62
b = -0.56
c = 9.8
k = 2
[train]
log_every = 2
threads = 1
[backend]
name = "local"
command = ["python", "-m", "trainer"]
[backend.local]
max_parallel = 2
[backend.slurm]
sbatch_extra = ["gres=gpu:1", "exclusive"]
[resources]
nodes = 1
procs_per_node = 2
mem_gb = 4
time_min = 30
"""
    # seeds and lr_scales follow [grid]'s keys in BASE, so they belong to [grid]
    s = parse_spec_text(text, "t.toml")
    assert len(s.grid.lr) == 9 and math.isclose(s.grid.lr[0], 2**-8)
    assert s.grid.horizons_tokens == (1024, 2048)
    assert s.grid.seeds == (30, 3034)
    assert s.grid.lr_scales == ((1.0, 0.125, 1.0), (1.0, 1.0, 1.0))
    assert [m.name for m in s.models] == ["test-micro", "wide"]
    assert s.models[1].config.d_model == 64
    assert s.optim.momentum == 0.9 and s.schedule.decay_fraction == 0.25
    assert s.window is not None and s.window.k == 2
    assert s.train == {"log_every": 2, "threads": 1}
    assert s.backend.command == ("python", "-m", "trainer")
    assert s.backend.config("local").max_parallel == 2
    assert s.resources.world_size == 2 and s.resources.time_min == 30
    assert s.resources.mem_gb == 4.0 and isinstance(s.resources.mem_gb, float)


MALFORMED = [
    ("bad toml", "name = \n", None, "bad TOML"),
    ("unknown top key", 'colour = "red"', "colour", "unknown key"),
    ("missing name", None, "name", "required"),
    ("bad name", 'name = "a/b"', "name", "letters"),
    ("no models", "models = []", "models", "at least one"),
    ("unknown preset", '[[models]]\npreset = "gpt5"', "preset", "unknown preset"),
    (
        "bad model override",
        '[[models]]\nname = "m2"\npreset = "test-micro"\nd_model = 33',
        "models[1]",
        "n_heads",
    ),
    (
        "unknown model key",
        '[[models]]\nname = "m2"\npreset = "test-micro"\nwidth = 3',
        "models[1]",
        "unknown key",
    ),
    ("duplicate model", '[[models]]\npreset = "test-micro"', "models[1].name", "duplicate"),
    ("lr <= 0", None, "grid.lr", "learning rate in 2^-40..2^10"),
    ("lr wrong type", None, "grid.lr", "expected a number"),
    ("empty batch axis", None, "grid.batch_size", "non-empty"),
    ("float batch", None, "grid.batch_size", "integer"),
    ("horizon not divisible", None, "grid.batch_size = 4", "multiple of batch_size*seq_len"),
    ("both horizon keys", None, "grid.log2_horizons", "not both"),
    ("log2 step <= 0", None, "grid.lr.log2_step", "> 0"),
    ("unknown grid key", None, "grid.lrs", "unknown key"),
    ("bad lr_scales", None, "grid.lr_scales", "[in, hidden, out]"),
    ("lr in optim", "[optim]\nlr = 0.1", "optim.lr", "[grid]"),
    ("unknown optim key", "[optim]\nmomentom = 0.1", "optim.momentom", "unknown key"),
    ("bad momentum", "[optim]\nmomentum = 1.5", "optim.momentum", "[0, 1)"),
    ("bad schedule kind", '[schedule]\nkind = "linear"', "schedule.kind", "one of"),
    ("schedule total_steps", "[schedule]\ntotal_steps = 10", "schedule.total_steps", "derived"),
    ("bad data kind", '[data]\nkind = "web"', "data.kind", "one of"),
    ("train owns batch", "[train]\nbatch_size = 4", "train.batch_size", "other tables"),
    ("train wrong type", '[train]\nlog_every = "often"', "train.log_every", "integer"),
    ("unknown backend", '[backend]\nname = "k8s"', "backend.name", "unknown backend"),
    ("bad command", '[backend]\ncommand = "python"', "backend.command", "list of strings"),
    ("max_parallel 0", "[backend.local]\nmax_parallel = 0", "backend.local.max_parallel", "in 1.."),
    ("max_parallel in [backend]", "[backend]\nmax_parallel = 2", "backend.max_parallel", "unknown"),
    ("resources.partition", '[resources]\npartition = "gpu"', "resources.partition", "unknown key"),
    ("unknown resource", "[resources]\ngpus = 1", "resources.gpus", "unknown key"),
    ("resource type", '[resources]\nnodes = "two"', "resources.nodes", "integer"),
    ("world size", "[resources]\nprocs_per_node = 3", None, "world size 3"),
    ("window missing c", "[window]\na = 1\nb = 1", "window.c", "required"),
    ("window k negative", "[window]\na = 1\nb = 1\nc = 1\nk = -1", "window.k", "0..1000"),
    ("window a nan", "[window]\na = nan\nb = 1\nc = 1", "window.a = nan", "finite"),
]

# Cases whose change is to [grid] (a TOML table cannot be re-opened, so BASE's grid is replaced).
GRID_EDITS = {
    "missing name": ('name = "t"\n', ""),
    "lr <= 0": ("lr = [0.01, 0.02]", "lr = [0.01, -0.02]"),
    "lr wrong type": ("lr = [0.01, 0.02]", 'lr = [0.01, "big"]'),
    "empty batch axis": ("batch_size = [4, 8]", "batch_size = []"),
    "float batch": ("batch_size = [4, 8]", "batch_size = [4, 8.5]"),
    "horizon not divisible": ("horizons_tokens = [1024, 2048]", "horizons_tokens = [1000]"),
    "both horizon keys": (
        "horizons_tokens = [1024, 2048]",
        "horizons_tokens = [1024]\nlog2_horizons = [10]",
    ),
    "log2 step <= 0": ("lr = [0.01, 0.02]", "lr = {log2_from = -8, log2_to = -4, log2_step = 0}"),
    "unknown grid key": ("lr = [0.01, 0.02]", "lr = [0.01]\nlrs = [0.1]"),
    "bad lr_scales": ("lr = [0.01, 0.02]", "lr = [0.01]\nlr_scales = [[1, 2]]"),
}


@pytest.mark.parametrize(("case", "extra", "key", "why"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_is_one_clear_line(
    case: str, extra: str | None, key: str | None, why: str
) -> None:
    if case in GRID_EDITS:
        old, new = GRID_EDITS[case]
        text = BASE.replace(old, new)
    elif case == "bad toml":
        text = extra or ""
    elif case == "no models":
        text = BASE.replace('[[models]]\npreset = "test-micro"', "").replace(
            "[grid]", extra + "\n[grid]"
        )
    elif extra.startswith(("name", "colour")):
        text = BASE.replace(
            'name = "t"', extra if extra.startswith("name") else 'name = "t"\n' + extra
        )
    else:
        text = spec_with(extra or "")
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "sweeps/x.toml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("sweeps/x.toml: "), msg
    if key:
        assert key in msg, msg
    assert why in msg, msg


def test_at_least_twenty_malformed_cases() -> None:
    assert len(MALFORMED) >= 20


def test_spec_error_renders_value() -> None:
    e = SpecError("f.toml", "grid.lr", -1, "must be > 0")
    assert str(e) == "f.toml: grid.lr = -1: must be > 0"
    assert isinstance(e, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.toml")


def test_wsd_needs_a_constant_phase() -> None:
    text = BASE.replace("horizons_tokens = [1024, 2048]", "horizons_tokens = [128]")
    text = text.replace("batch_size = [4, 8]", "batch_size = [8]")
    with pytest.raises(SpecError, match="decay_fraction"):
        parse_spec_text(text + '\n[schedule]\nkind = "wsd"\ndecay_fraction = 1.0', "x.toml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "sweeps").glob("*.toml")))
def test_shipped_specs_are_valid(name: str) -> None:
    # host_checks=False: cluster specs name data that exists only on their cluster
    spec = load_spec(REPO / "sweeps" / name, host_checks=False)
    assert spec.name.startswith(name.removesuffix(".toml"))
    assert plan_sweep(spec)
