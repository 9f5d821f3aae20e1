"""Planner: grid sizes, horizon sharing, stable unique ids, windows, extra points."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper.errors import SpecError
from sweeper.plan import GridPoint, _replace, extra_point, log2_tag, plan_sweep
from sweeper.records import RunRecord, run_id
from sweeper.spec import SweepSpec, branch_step, parse_spec_text
from trainer.config import TrainConfig

SEQ = 16  # test-micro


def make_spec(
    lr_exps: list[float],
    batches: list[int],
    horizon_exps: list[int],
    seeds: list[int] = (30,),
    schedule: str = "constant",
    models: int = 1,
    scales: list[list[float]] | None = None,
    window: str = "",
) -> SweepSpec:
    lrs = ", ".join(repr(2.0**e) for e in lr_exps)
    text = f'name = "p"\n[grid]\nlr = [{lrs}]\nbatch_size = {list(batches)}\n'
    text += f"log2_horizons = {list(horizon_exps)}\nseeds = {list(seeds)}\n"
    if scales:
        text += f"lr_scales = {scales}\n"
    text += f'[schedule]\nkind = "{schedule}"\ndecay_fraction = 0.25\n'
    for i in range(models):
        text += f'[[models]]\nname = "m{i}"\npreset = "test-micro"\nn_layers = {i + 1}\n'
    return parse_spec_text(text + window, "p.toml")


axes = st.fixed_dictionaries(
    {
        "lr_exps": st.lists(st.integers(-12, 0), min_size=1, max_size=4, unique=True),
        "batches": st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3, unique=True),
        "horizon_exps": st.lists(st.integers(8, 12), min_size=1, max_size=3, unique=True),
        "seeds": st.lists(st.integers(0, 5000), min_size=1, max_size=2, unique=True),
        "schedule": st.sampled_from(["constant", "wsd", "cosine"]),
        "models": st.integers(1, 2),
    }
)


@settings(max_examples=40, deadline=None)
@given(a=axes)
def test_grid_sizes_and_sharing(a: dict) -> None:
    spec = make_spec(**a)
    plan = plan_sweep(spec)
    points = len(a["lr_exps"]) * len(a["batches"]) * len(a["seeds"]) * a["models"]
    n_d = len(a["horizon_exps"])
    kinds = Counter(r.kind for r in plan.runs)
    if a["schedule"] == "constant":
        assert kinds == {"single": points}
        assert all(
            list(r.horizons_tokens) == sorted(2**e for e in a["horizon_exps"]) for r in plan.runs
        )
    elif a["schedule"] == "cosine":
        assert kinds == {"single": points * n_d}
        assert plan.totals["sharing_saved_fraction"] == pytest.approx(0.0)
    else:
        assert kinds == {"trunk": points, "branch": points * n_d}
    ids = [r.id for r in plan.runs]
    assert len(set(ids)) == len(ids)
    assert plan.totals["flops"] <= plan.totals["flops_without_sharing"] * (1 + 1e-12)


@settings(max_examples=25, deadline=None)
@given(a=axes)
def test_ids_are_stable_and_order_independent(a: dict) -> None:
    ids = [r.id for r in plan_sweep(make_spec(**a)).runs]
    again = [r.id for r in plan_sweep(make_spec(**a)).runs]
    assert ids == again
    shuffled = {**a, "lr_exps": a["lr_exps"][::-1], "batches": a["batches"][::-1]}
    assert set(r.id for r in plan_sweep(make_spec(**shuffled)).runs) == set(ids)


@settings(max_examples=25, deadline=None)
@given(a=axes, new_lr=st.integers(-20, -13), new_b=st.sampled_from([8]))
def test_adding_grid_points_keeps_every_run(a: dict, new_lr: int, new_b: int) -> None:
    old = {r.id for r in plan_sweep(make_spec(**a)).runs}
    bigger = {**a, "lr_exps": a["lr_exps"] + [new_lr], "batches": a["batches"] + [new_b]}
    new = {r.id for r in plan_sweep(make_spec(**bigger)).runs}
    assert old < new


@settings(max_examples=25, deadline=None)
@given(a=axes.filter(lambda a: a["schedule"] == "constant" and max(a["horizon_exps"]) > 8))
def test_constant_runs_keep_ids_when_a_smaller_horizon_is_added(a: dict) -> None:
    old = {r.id for r in plan_sweep(make_spec(**a)).runs}
    smaller = min(a["horizon_exps"]) - 1
    if smaller < 8:
        return
    extended = plan_sweep(make_spec(**{**a, "horizon_exps": a["horizon_exps"] + [smaller]}))
    assert {r.id for r in extended.runs} == old
    larger = plan_sweep(make_spec(**{**a, "horizon_exps": a["horizon_exps"] + [13]}))
    assert not ({r.id for r in larger.runs} & old)  # a longer run is a different run


def test_wsd_branches_fork_from_their_trunk() -> None:
    plan = plan_sweep(make_spec([-4], [4], [9, 10, 11], schedule="wsd"))
    trunk, *branches = plan.runs
    assert trunk.kind == "trunk" and trunk.train.schedule.kind == "constant"
    tps = 4 * SEQ
    for b, d in zip(branches, [2**9, 2**10, 2**11], strict=True):
        steps = d // tps
        assert b.parent == trunk.id
        assert b.train.branch is not None
        assert (b.train.branch.run_dir, b.train.branch.step) == (
            f"runs/{trunk.id}",
            branch_step(steps, 0.25),
        )
        assert b.train.schedule.kind == "wsd" and b.train.schedule.total_steps == steps
        assert b.train.branch.step in trunk.train.checkpoint_steps
        assert b.trained_tokens == d - b.train.branch.step * tps
    assert trunk.train.checkpoint_steps == (6, 12, 24)
    assert plan.totals["sharing_saved_fraction"] > 0.3


def test_every_planned_config_is_a_valid_train_config() -> None:
    for schedule in ("constant", "wsd", "cosine"):
        plan = plan_sweep(
            make_spec([-6, -3], [2, 8], [10, 11], schedule=schedule, scales=[[1, 0.125, 1]])
        )
        for r in plan.runs:
            d = r.train.to_dict()
            cfg = TrainConfig.from_dict(d)
            assert cfg == r.train  # the planner's fast copies equal a validated config
            assert r.steps == cfg.total_steps
            # the id is the hash of the full canonical JSON of the record's config
            if r.kind == "single":
                d["horizons_tokens"] = d["horizons_tokens"][-1:]
            assert r.id == run_id(r.slug, r.kind, d)
            assert r.flops == pytest.approx(cfg.flops_per_token() * r.trained_tokens)
            assert RunRecord.from_dict(r.to_dict()) == r  # JSON round trip


def test_flops_count_non_embedding_parameters_and_attention() -> None:
    # Kaplan et al. (2020): C = 6 N_non-embedding + 6 n_layer n_ctx d_attn per token
    cfg = plan_sweep(make_spec([-4], [4], [10])).runs[0].train
    m = cfg.model
    per_layer = 4 * m.d_model * m.d_model + 3 * m.d_model * m.mlp_hidden
    expected = 6 * m.n_layers * per_layer + 6 * m.n_layers * m.seq_len * m.d_model
    assert cfg.flops_per_token() == expected


def test_fast_replace_equals_dataclasses_replace() -> None:
    cfg = plan_sweep(make_spec([-4], [4], [10])).runs[0].train
    changes = {"batch_size": 8, "seed": 3, "horizons_tokens": (512,)}
    assert _replace(cfg, **changes) == dataclasses.replace(cfg, **changes)
    assert hash(_replace(cfg, **changes)) == hash(dataclasses.replace(cfg, **changes))


def test_slugs_are_readable() -> None:
    r = plan_sweep(make_spec([-6.5], [4], [10], scales=[[1, 0.125, 1]])).runs[0]
    assert r.id.startswith("m0_lr2^-6.5_B4_s30_ls1-0.125-1-")
    assert log2_tag(0.3) == "0.3" and log2_tag(2**-6) == "2^-6"


def test_window_keeps_k_points_around_the_law() -> None:
    # log2 lr* = 0*log2 B + 0*log2 D - 5 -> centre at 2^-5, +-1 grid point
    spec = make_spec(
        list(range(-10, 0)), [4], [10], window="[window]\na = 0\nb = 0\nc = -5\nk = 1\n"
    )
    lrs = sorted(r.lr for r in plan_sweep(spec).runs)
    assert [math.log2(x) for x in lrs] == [-6, -5, -4]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_window_is_the_union_over_the_horizons_a_run_serves(schedule: str) -> None:
    # log2 lr* = -0.5 * log2 D + 0: centre -4 at D = 2^8, -5 at 2^10, -6 at 2^12; k = 0
    spec = make_spec(list(range(-10, 0)), [4], [8, 10, 12], schedule=schedule,
                     window="[window]\na = 0\nb = -0.5\nc = 0\nk = 0\n")  # fmt: skip
    runs = plan_sweep(spec).runs
    if schedule == "constant":  # one run serves every D: the union of the three windows
        assert sorted(math.log2(r.lr) for r in runs) == [-6, -5, -4]
    else:  # one run per D, each inside its own (B, D) window
        got = sorted((r.horizons_tokens[-1], math.log2(r.lr)) for r in runs)
        assert got == [(2**8, -4), (2**10, -5), (2**12, -6)]


def test_extra_points_are_validated_and_merged() -> None:
    spec = make_spec([-4], [4], [10])
    p = extra_point({"model": "m0", "lr": 0.5, "batch_size": 8, "source": "refine"}, spec, "x.json")
    assert p == GridPoint("m0", 0.5, 8, 30, (1.0, 1.0, 1.0), "refine")
    plan = plan_sweep(spec, [p, p])
    assert len(plan.runs) == 2 and plan.runs[1].source == "refine"
    for bad, key in [
        ({"model": "zz", "lr": 1, "batch_size": 4}, "model"),
        ({"model": "m0", "lr": -1, "batch_size": 4}, "lr"),
        ({"model": "m0", "lr": 1, "batch_size": 3}, "batch_size"),
        ({"model": "m0", "lr": 1, "batch_size": 4, "x": 1}, "x"),
    ]:
        with pytest.raises(SpecError, match=key):
            extra_point(bad, spec, "x.json")


def test_fast_ids_match_full_json_for_awkward_values() -> None:
    text = """
name = "odd"
[[models]]
preset = "test-micro"
[grid]
lr = [1e-05, 0.30000000000000004, 3e-7, 123.456]
batch_size = [2]
horizons_tokens = [96, 192]
seeds = [0, 123456789]
lr_scales = [[1e-3, 0.125, 7]]
[schedule]
kind = "wsd"
decay_fraction = 0.3
"""
    plan = plan_sweep(parse_spec_text(text, "odd.toml"))
    for r in plan.runs:
        d = r.train.to_dict()
        if r.kind == "single":
            d["horizons_tokens"] = d["horizons_tokens"][-1:]
        assert r.id == run_id(r.slug, r.kind, d)
