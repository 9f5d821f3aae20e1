"""The paper's protocol at cluster scale: per-model grids, a schedules axis, micro-batches and
resources per (model, B), and the paper's main-study spec."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sweeper import load_spec, plan
from sweeper.errors import SpecError
from sweeper.spec import parse_spec_text
from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SWEEPER = str(Path(sys.executable).with_name("sweeper"))

BASE = """
name = "proto"
[[models]]
preset = "test-micro"
batch_size = [8, 4096]
lr = [0.5]
max_micro_batch = 4
[[models]]
name = "wide"
preset = "test-micro"
d_model = 64
batch_size = [16]
lr = [0.25, 0.125]
[grid]
horizons_tokens = [131072, 262144]
[resources]
nodes = 1
procs_per_node = 4
"""


def test_per_model_grids_micro_batches_and_world_size() -> None:
    spec = parse_spec_text(BASE, "p.toml")
    runs = plan(spec)
    got = Counter((r.model, r.batch_size, r.lr) for r in runs)
    assert got == {("test-micro", 8, 0.5): 1, ("test-micro", 4096, 0.5): 1,
                   ("wide", 16, 0.25): 1, ("wide", 16, 0.125): 1}  # fmt: skip
    for r in runs:
        per_rank = r.batch_size // 4
        micro = r.train.micro_batch_size or per_rank
        assert per_rank % micro == 0
        TrainConfig.from_dict(r.train.to_dict()).validate(world_size=4)
        if r.model == "test-micro":  # B = 8 and B = 4096 both plan: 2 and 1024 per rank
            assert micro == min(per_rank, 4)


def test_schedules_axis_plans_each_schedule_as_its_own_series() -> None:
    text = BASE + '[[schedules]]\nkind = "constant"\n[[schedules]]\nkind = "wsd"\n'
    text += 'decay_fraction = 0.25\n[[schedules]]\nkind = "cosine"\n'
    runs = plan(parse_spec_text(text, "p.toml"))
    kinds = Counter((r.kind.value, r.train.schedule.kind) for r in runs)
    points = 4
    assert kinds == {("single", "constant"): points, ("trunk", "constant"): points,
                     ("branch", "wsd"): 2 * points, ("single", "cosine"): 2 * points}  # fmt: skip
    assert all(r.slug.split("_")[-1].split("-")[0] in {"constant", "wsd0.25", "cosine"}
               or "_trunk" in r.slug or "_D2^" in r.slug for r in runs)  # fmt: skip
    with pytest.raises(SpecError, match="not both"):
        parse_spec_text(text + '[schedule]\nkind = "constant"\n', "p.toml")


def test_resource_rules_by_model_and_batch_with_time_from_cost() -> None:
    text = (
        BASE
        + """
[[resources.rules]]
model = "wide"
gpus_per_node = 4
[[resources.rules]]
batch_size_min = 1024
nodes = 2
mem_gb = 128
[[resources.rules]]
time_from_cost = true
[cost]
throughput = {test-micro = 1000.0, wide = 100.0}
margin = 2.0
"""
    )
    runs = {(r.model, r.batch_size, r.lr): r for r in plan(parse_spec_text(text, "p.toml"))}
    assert runs[("wide", 16, 0.25)].resources.gpus_per_node == 4
    big = runs[("test-micro", 4096, 0.5)].resources
    assert (big.nodes, big.mem_gb, big.gpus_per_node) == (2, 128, 0)
    small = runs[("test-micro", 8, 0.5)]
    assert small.resources.nodes == 1
    # 262144 tokens at 1000 tokens/s x margin 2 = 8.7 minutes -> 9
    assert small.resources.time_min == 9
    with pytest.raises(SpecError, match=r"resources.rules\[0\].gpus_per_node = 99"):
        parse_spec_text(BASE + "[[resources.rules]]\ngpus_per_node = 99\n", "p.toml")


def test_paper_main_study_plans_with_its_cost_table() -> None:
    r = subprocess.run([SWEEPER, "plan", str(REPO / "sweeps" / "paper-proxy.toml"), "--format",
                        "json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    models = [row["model"] for row in rows]
    assert models[0] == "proxy" and models[-1] == "total"
    assert {"proxy", "x4-width", "x12-width", "x8-depth", "x32-depth"} <= set(models)
    total = rows[-1]
    assert total["runs"] > 10_000 and total["gpu_hours"] > 0
    spec = load_spec(REPO / "sweeps" / "paper-proxy.toml", host_checks=False)
    cadence = {r.batch_size: r.train.log_interval for r in plan(spec)[:1]}
    assert all(b * 4096 * steps == 2**26 for b, steps in cadence.items())  # 2^26 tokens at any B


WIDTH = """
name = "width"
[[models]]
name = "fam"
preset = "cpu-tiny"
widths = [32, 64, 128, 256]
base_width = 64
width_exponents = [0.0, 1.0, 0.5]
adam_eps_width_exponent = 1.0
[optim]
name = "adamw"
[grid]
lr = [0.01]
batch_size = [8]
horizons_tokens = [8192]
group_scan = {log2_from = -1, log2_to = 1, log2_step = 1}
"""


def test_width_family_scales_group_rates_and_group_scan_varies_one_group() -> None:
    runs = plan(parse_spec_text(WIDTH, "w.toml"))
    widths = {r.model: r.train.model for r in runs}
    assert {m: (c.d_model, c.hdim) for m, c in widths.items()} == {
        f"fam-w{w}": (w, 32) for w in (32, 64, 128, 256)
    }  # head dim fixed, heads scaled
    # 1 base + 2 factors x 3 groups = 7 scans per width
    assert Counter(r.model for r in runs) == {f"fam-w{w}": 7 for w in (32, 64, 128, 256)}
    base = {r.model: r for r in runs if "_ls" not in r.slug}
    for w in (32, 64, 128, 256):
        r = base[f"fam-w{w}"]
        ratio = w / 64
        assert r.lr_scales == pytest.approx((1.0, ratio**-1.0, ratio**-0.5))
        assert r.train.optim.adam_eps == pytest.approx(1e-8 / ratio)
    # the scan varies one group at a time, the others held at their base
    scans = [r.lr_scales for r in runs if r.model == "fam-w64"]
    varied = [sum(abs(s - 1.0) > 1e-12 for s in t) for t in scans]
    assert sorted(varied) == [0, 1, 1, 1, 1, 1, 1]
