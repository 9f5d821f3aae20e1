"""Newton-Schulz, the LMOs, Scion (single process and 2 gloo ranks), Adam-atan2, the builder."""

from __future__ import annotations

import io
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from trainer import newton_schulz as ns
from trainer import optim
from trainer.config import PRESETS, OptimConfig, model_from_preset
from trainer.model import Transformer
from trainer.norms import one_to_rms_embedding, rms_to_inf, rms_to_rms, sign_norm
from trainer.optim import (
    MUON_COEFFICIENTS,
    TUNED_COEFFICIENTS,
    AdamAtan2,
    Scion,
    build_optimizer,
    check_partition,
    colnorm_lmo,
    newton_schulz,
    param_groups,
    rownorm_lmo,
    sign_lmo,
    spectral_lmo,
)

TINY = model_from_preset("cpu-tiny")  # d=64, 2 layers, 2 heads, mlp 176, vocab 256, seq 64


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY)


def _loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def _batch(seed: int = 1, batch: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, TINY.seq_len + 1), generator=g)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ Newton-Schulz


def _iterated_polynomial(
    x: torch.Tensor, schedule: list[tuple[float, float, float]]
) -> torch.Tensor:
    for a, b, c in schedule:
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (64, 64), (24, 96), (96, 24)])
@pytest.mark.parametrize("coefficients", ["muon", "tuned"])
def test_newton_schulz_keeps_singular_vectors_and_maps_singular_values(
    shape: tuple[int, int], coefficients: str
) -> None:
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    X = newton_schulz(G, coefficients=coefficients, eps=0.0)
    assert X.shape == G.shape and X.dtype == G.dtype
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ X @ Vh.T
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.abs().max() < 1e-10  # same singular vectors as U V^T
    schedule = [MUON_COEFFICIENTS] * 5 if coefficients == "muon" else list(TUNED_COEFFICIENTS)
    expected = _iterated_polynomial(S / torch.linalg.norm(G), schedule)
    torch.testing.assert_close(torch.diagonal(D), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("coefficients", ["muon", "tuned"])
def test_gram_form_equals_plain_iteration(coefficients: str) -> None:
    """The flop-saving Gram form (wide fp32/fp64 matrices) is the same polynomial of X_0."""
    torch.manual_seed(0)
    G = torch.randn(3, 32, 80, dtype=torch.float64)
    X = G / torch.linalg.matrix_norm(G, keepdim=True)
    schedule = ns._coefficient_schedule(coefficients, 5)
    plain = ns._newton_schulz_plain(X, schedule)
    for restart_every in (1, 2, 3, 5):
        gram = ns._newton_schulz_gram(X, schedule, restart_every)
        torch.testing.assert_close(gram, plain, rtol=1e-10, atol=1e-10)
    gram32 = ns._newton_schulz_gram(X.float(), schedule)
    torch.testing.assert_close(gram32, plain.float(), rtol=0, atol=2e-6)
    assert ns.uses_gram_form(32, 80, torch.float32) and ns.uses_gram_form(80, 40, torch.float64)
    assert not ns.uses_gram_form(32, 63, torch.float32)
    assert not ns.uses_gram_form(32, 80, torch.bfloat16)


# Wide shapes for the fp32 accuracy test: one per aspect ratio of the presets' matrices, 32 rows
# (the fewest of any preset). bench/bench_trainer.py measures the full preset shapes.
NS_ACCURACY_SHAPES = [
    (32, 32),  # square (attention; also where vocab == d)
    (32, 64),  # n = 2m: the smallest ratio that takes the Gram form
    (32, 88),  # 2.75: the SwiGLU matrices of every preset (d x 2.75 d)
    (32, 128),  # 4: cpu-small's byte vocabulary
    (32, 256),  # 8: test-micro's byte vocabulary
    (32, 1336),  # 41.75: the x12-width preset's vocabulary, 3072 x 128256
    (32, 4008),  # 125.25: x4-width's, 1024 x 128256
    (32, 16032),  # 501: proxy's and the depth presets', 256 x 128256
]


def _spectrum_matrices(count: int, m: int, n: int, decades: int) -> torch.Tensor:
    """float32 matrices: Gaussian (``decades = 0``) or gradient-like, with singular values
    log-uniform over ``decades`` decades (the proxy's SwiGLU gradients span ~2 at init)."""
    gen = torch.Generator().manual_seed(m * 100_003 + n)
    if decades == 0:
        return torch.randn(count, m, n, generator=gen)
    U = torch.linalg.qr(torch.randn(count, m, m, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(count, n, m, generator=gen, dtype=torch.float64))[0]
    return ((U * torch.logspace(0, -decades, m, dtype=torch.float64)) @ V.mT).float()


def _wide_reference(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plain iteration (Muon, 5 steps) in ``dtype`` on the wide orientation of ``G``, returned
    in ``G``'s orientation (iterating on a tall ``n x m`` matrix would form ``n x n`` products)."""
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).to(dtype)
    X = ns._newton_schulz_plain(X / ns._frobenius_norm(X), ns._coefficient_schedule("muon", 5))
    return X.mT if tall else X


def _relative_error(X: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``||X - ref||_F / ||ref||_F`` over the batch."""
    diff = torch.linalg.vector_norm((X.double() - ref).flatten(1), dim=1)
    return float((diff / torch.linalg.vector_norm(ref.flatten(1), dim=1)).max())


def _ns_relative_error(G: torch.Tensor, **kwargs: object) -> float:
    """Largest relative error of ``newton_schulz(G)`` against the float64 plain iteration."""
    out = newton_schulz(G, **kwargs)  # type: ignore[arg-type]
    return _relative_error(out, _wide_reference(G, torch.float64))


def test_accuracy_shapes_cover_the_preset_aspect_ratios() -> None:
    tested = sorted(n / m for m, n in NS_ACCURACY_SHAPES)
    for c in map(model_from_preset, PRESETS):
        for rows in (c.n_heads * c.hdim, c.kv_heads * c.hdim, c.mlp_hidden, c.vocab_size):
            ratio = max(rows, c.d_model) / min(rows, c.d_model)
            assert any(abs(ratio / r - 1) < 0.01 for r in tested), ratio
    forms = {ns.uses_gram_form(m, n, torch.float32) for m, n in NS_ACCURACY_SHAPES}
    assert forms == {True, False}


@pytest.mark.parametrize("m,n", NS_ACCURACY_SHAPES, ids=lambda v: str(v))
@pytest.mark.usefixtures("one_thread")
def test_newton_schulz_fp32_accuracy_per_aspect_ratio(m: int, n: int) -> None:
    """float32 NS within 1e-5 of the float64 iteration and within 3x the plain float32
    iteration's own error, wide and tall, Gaussian and 3-decade inputs (measured here: 1e-6 to
    5e-6, 0.7-1.5x the plain iteration's)."""
    for decades in (0, 3):
        G = _spectrum_matrices(2, m, n, decades)
        ref = _wide_reference(G, torch.float64)
        plain = _relative_error(_wide_reference(G, torch.float32), ref)
        for X in (G, G.mT.contiguous()):  # wide, then tall (the same path, transposed)
            err = _ns_relative_error(X)
            assert err < 1e-5, (m, n, decades, X.shape, err)
            assert err < 3 * plain, (m, n, decades, X.shape, err, plain)


@pytest.mark.usefixtures("one_thread")
def test_unrestarted_gram_form_was_inaccurate_in_fp32() -> None:
    """Why the Gram form restarts: without, fp32 is off by > 1e-5 on ill-conditioned inputs."""
    G = _spectrum_matrices(3, 64, 176, 3)
    assert _ns_relative_error(G, restart_every=5) > 2e-5
    assert _ns_relative_error(G) < 1e-5


def test_frobenius_norm_is_accurate_on_large_matrices() -> None:
    """A single fp32 reduction over 8M entries is off by ~1e-4; the row-norm form is not."""
    G = torch.randn(1, 2048, 4096, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.vector_norm(G.double().flatten())
    assert abs(float(ns._frobenius_norm(G).double().squeeze()) / float(exact) - 1) < 1e-6


def test_newton_schulz_is_deterministic() -> None:
    G = _spectrum_matrices(4, 64, 176, 2)
    assert torch.equal(newton_schulz(G), newton_schulz(G.clone()))
    assert torch.equal(newton_schulz(G, dtype="bfloat16"), newton_schulz(G, dtype="bfloat16"))


def test_newton_schulz_singular_value_bands() -> None:
    torch.manual_seed(0)
    G = torch.randn(48, 96)
    s_muon = torch.linalg.svdvals(newton_schulz(G, coefficients="muon"))
    s_tuned = torch.linalg.svdvals(newton_schulz(G, coefficients="tuned"))
    assert 0.6 < s_muon.min() and 1.05 < s_muon.max() < 1.16
    assert 0.95 < s_tuned.min() and s_tuned.max() < 1.05


def test_newton_schulz_batched_equals_per_matrix() -> None:
    torch.manual_seed(0)
    G = torch.randn(4, 24, 40)
    batched = newton_schulz(G)
    for i in range(4):
        torch.testing.assert_close(batched[i], newton_schulz(G[i]), rtol=1e-5, atol=1e-6)
    tall = G.mT.contiguous()
    torch.testing.assert_close(newton_schulz(tall), batched.mT, rtol=1e-5, atol=1e-6)


def test_newton_schulz_dtype_handling_and_bad_input() -> None:
    G = torch.randn(16, 32)
    out = newton_schulz(G, dtype="bfloat16")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, newton_schulz(G), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        newton_schulz(torch.randn(2, 2, 2, 2))
    with pytest.raises(ValueError, match="tuned"):
        newton_schulz(G, steps=4, coefficients="tuned")
    with pytest.raises(ValueError, match="restart_every"):
        newton_schulz(G, restart_every=0)


# --------------------------------------------------------------------------------------------- LMOs


def test_lmo_defining_properties() -> None:
    torch.manual_seed(0)
    G = torch.randn(40, 24)
    row_rms = colnorm_lmo(G).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, torch.ones(40))
    out = rownorm_lmo(G)
    assert rms_to_inf(out) == pytest.approx(1.0, rel=1e-6)
    every_row = math.sqrt(24) * torch.linalg.vector_norm(out, dim=1)
    torch.testing.assert_close(every_row, torch.ones(40))  # every row on the unit sphere
    sign = sign_lmo(G)
    torch.testing.assert_close(sign.abs(), torch.full_like(G, 1 / 24))
    assert torch.equal(sign.sign(), G.sign())
    assert sign_norm(sign) == pytest.approx(1 / 24)
    spectral = spectral_lmo(G)
    assert 1.0 < rms_to_rms(spectral) < 1.16


# -------------------------------------------------------------------------------------------- Scion


def _scion_step(model: Transformer, cfg: OptimConfig, idx: torch.Tensor) -> torch.optim.Optimizer:
    opt = build_optimizer(model, cfg, "cpu")
    opt.track_norms = True
    _loss(model, idx).backward()
    opt.step()
    return opt


def test_scion_update_norms_per_layer() -> None:
    """Output update has RMS->inf exactly lr, embedding rows RMS lr, hidden RMS->RMS ~ lr."""
    model = _model()
    before = _params(model)
    idx = _batch()
    lr = 0.01
    opt = _scion_step(model, OptimConfig(lr=lr), idx)
    after = _params(model)
    delta = {n: after[n] - before[n] for n in after}
    assert rms_to_inf(delta["output.weight"]) == pytest.approx(lr, rel=1e-5)
    seen = idx[:, :-1].unique()
    row_rms = delta["tok_embeddings.weight"][seen].pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, torch.full_like(row_rms, lr), rtol=1e-5, atol=0)
    # sup over [0, 1] of the 5-fold Muon polynomial is 1.2024: sigma_max(NS5) <= 1.2024
    for n, d in delta.items():
        if n not in ("output.weight", "tok_embeddings.weight"):
            assert lr * 0.9 < rms_to_rms(d) < lr * 1.2024, n
    w2 = "layers.1.feed_forward.w2.weight"
    norms = opt.last_update_norms
    assert norms["out"] == pytest.approx(lr, rel=1e-5)
    assert norms["in"] == pytest.approx(one_to_rms_embedding(delta["tok_embeddings.weight"]))
    assert norms["hidden"] == pytest.approx(rms_to_rms(delta[w2]), rel=1e-4)


def test_scion_step_on_gqa_model_mixed_shapes() -> None:
    """GQA gives 64x64, 32x64 (wk, wv), 176x64 and 64x176 matrices, each with a spectral LMO."""
    cfg = model_from_preset("cpu-tiny", n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    before = _params(model)
    opt = build_optimizer(model, OptimConfig(lr=0.01), "cpu")
    _loss(model, _batch()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n not in ("output.weight", "tok_embeddings.weight"):
            assert 0.009 < rms_to_rms(p.detach() - before[n]) < 0.01 * 1.2024, n


def test_scion_sign_output_entries() -> None:
    model = _model()
    before = model.output.weight.detach().clone()
    lr = 0.02
    _scion_step(model, OptimConfig(lr=lr, output_norm="sign"), _batch())
    delta = (model.output.weight.detach() - before).abs()
    d_in = TINY.d_model
    torch.testing.assert_close(delta, torch.full_like(delta, lr / d_in), rtol=1e-4, atol=1e-9)


def _single_param_scion(**kw: object) -> tuple[nn.Parameter, Scion]:
    p = nn.Parameter(torch.randn(6, 10))
    return p, Scion([{"params": [p], "role": "out", "norm": "rownorm"}], **kw)


def test_scion_momentum_zero_uses_raw_gradient() -> None:
    torch.manual_seed(0)
    p, opt = _single_param_scion(lr=0.1, momentum=0.0)
    w0, g = p.detach().clone(), torch.randn(6, 10)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * rownorm_lmo(g, 1e-20))
    assert not opt.state[p]  # no buffer kept


@pytest.mark.parametrize("nesterov", [False, True])
def test_scion_momentum_is_the_ema_of_gradients(nesterov: bool) -> None:
    torch.manual_seed(0)
    beta, lr = 0.9, 0.1
    p, opt = _single_param_scion(lr=lr, momentum=beta, nesterov=nesterov)
    g1, g2 = torch.randn(6, 10), torch.randn(6, 10)
    p.grad = g1.clone()
    opt.step()
    w1 = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = beta * (1 - beta) * g1 + (1 - beta) * g2
    d = beta * buf + (1 - beta) * g2 if nesterov else buf
    torch.testing.assert_close(p.detach(), w1 - lr * rownorm_lmo(d, 1e-20), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)


def test_scion_weight_decay_is_disco_style() -> None:
    torch.manual_seed(0)
    lr, wd = 0.05, 0.1
    p, opt = _single_param_scion(lr=lr, weight_decay=wd)
    w0, g = p.detach().clone(), torch.randn(6, 10)
    p.grad = g.clone()
    opt.step()
    expected = (1 - wd * lr) * w0 - lr * rownorm_lmo(g, 1e-20)
    torch.testing.assert_close(p.detach(), expected)


def test_scion_without_momentum_ignores_gradient_scale() -> None:
    a, b = _model(), _model()
    idx = _batch()
    for model, scale in ((a, 1.0), (b, 1000.0)):
        opt = build_optimizer(model, OptimConfig(lr=0.01), "cpu")
        (scale * _loss(model, idx)).backward()
        opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_scion_rejects_non_matrix_parameters_and_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"bias.*only 2-D"):
        Scion([{"params": [("bias", nn.Parameter(torch.zeros(3)))], "norm": "rownorm"}])
    with pytest.raises(ValueError, match="norm = 'frobenius'"):
        Scion([nn.Parameter(torch.zeros(3, 3))], norm="frobenius")
    with pytest.raises(ValueError, match="momentum"):
        Scion([nn.Parameter(torch.zeros(3, 3))], momentum=1.0)


@pytest.mark.slow
def test_scion_trains_a_tiny_model() -> None:
    """20 Scion steps on a learnable sequence (affine successor mod 256) lower the loss a lot."""
    model = _model()
    # The output norm grows by at most lr per step, and the logit margin needs ~ln(256): lr 1/4.
    opt = build_optimizer(model, OptimConfig(lr=2**-2), "cpu")
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (16, 1), generator=g)
    idx = (start + 5 * torch.arange(TINY.seq_len + 1)) % 256
    losses = []
    for _ in range(20):
        loss = _loss(model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.1)
    assert losses[-1] < 0.4 * losses[0]


# --------------------------------------------------------------------------------- Scion, 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        counted = []
        real_ns = optim.newton_schulz

        def counting_ns(G: torch.Tensor, *args: object) -> torch.Tensor:
            counted.append(G.shape[0] if G.ndim == 3 else 1)
            return real_ns(G, *args)

        optim.newton_schulz = counting_ns
        model = _model()
        opt = build_optimizer(model, OptimConfig(lr=0.01, momentum=0.5), "cpu")
        idx = _batch(batch=8)
        shard = idx.chunk(world)[rank]
        for _ in range(2):
            opt.zero_grad()
            _loss(model, shard).backward()
            for p in model.parameters():  # the caller averages gradients (DDP's job)
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
        torch.save({"params": _params(model), "ns_matrices": sum(counted)}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_scion_distributed_matches_single_process(tmp_path: Path) -> None:
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=0.01, momentum=0.5), "cpu")
    for _ in range(2):
        opt.zero_grad()
        _loss(model, _batch(batch=8)).backward()
        opt.step()
    expected = _params(model)
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    n_hidden = 7 * TINY.n_layers
    shares = []
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        shares.append(got["ns_matrices"])
        for n, p in got["params"].items():
            torch.testing.assert_close(p, expected[n], rtol=1e-4, atol=1e-5, msg=n)
    assert shares == [n_hidden, n_hidden]  # 2 steps x half of the 2L*7 matrices each


def test_snake_assignment_balances_work() -> None:
    owners = optim._snake_owners([10, 10, 5, 5, 1, 1, 1], 2)
    assert owners == [0, 1, 1, 0, 0, 1, 1]
    assert optim._snake_owners([3, 2, 1], 4) == [0, 1, 2]


# --------------------------------------------------------------------------------------------- Adam


def test_adam_atan2_first_step_and_scale_invariance() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    a = nn.Parameter(w.clone())
    b = nn.Parameter(w.clone())
    lr = 0.01
    opt_a, opt_b = AdamAtan2([a], lr=lr), AdamAtan2([b], lr=lr)
    for step in range(4):
        g = torch.randn(5, 7)
        a.grad, b.grad = g.clone(), 1e4 * g
        opt_a.step()
        opt_b.step()
        if step == 0:  # m_hat = g, v_hat = g^2: atan2(g, |g|) = +-pi/4
            torch.testing.assert_close(a.detach(), w - lr * 1.27 * math.pi / 4 * g.sign())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adam_atan2_bounded_steps_and_decoupled_decay() -> None:
    p = nn.Parameter(torch.ones(3, 4))
    opt = AdamAtan2([p], lr=0.1, weight_decay=0.5, betas=(0.0, 0.0))
    p.grad = torch.zeros(3, 4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 4), 1 - 0.1 * 0.5))  # atan2(0, 0) = 0
    p.grad = torch.full((3, 4), 1e-30)
    before = p.detach().clone()
    opt.step()
    assert ((before * 0.95 - p.detach()).abs() <= 0.1 * 1.27 * math.pi / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ["adamw", "adam_atan2"])
def test_adam_variants_track_update_norms(name: str) -> None:
    model = _model()
    before = _params(model)
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-3), "cpu")
    opt.track_norms = True
    _loss(model, _batch()).backward()
    opt.step()
    after = _params(model)
    norms = opt.last_update_norms
    w2 = "layers.1.feed_forward.w2.weight"
    assert norms["out"] == pytest.approx(
        rms_to_inf(after["output.weight"] - before["output.weight"])
    )
    assert norms["hidden"] == pytest.approx(rms_to_rms(after[w2] - before[w2]), rel=1e-5)
    emb = after["tok_embeddings.weight"] - before["tok_embeddings.weight"]
    assert norms["in"] == pytest.approx(one_to_rms_embedding(emb))


# ------------------------------------------------------------------------------- builder and state


def test_build_optimizer_groups() -> None:
    model = _model()
    cfg = OptimConfig(lr=0.02, lr_scale_hidden=0.125, lr_scale_out=0.5, output_norm="sign")
    opt = build_optimizer(model, cfg, "cpu")
    by_role = {g["role"]: g for g in opt.param_groups}
    assert [g["role"] for g in opt.param_groups] == ["in", "hidden", "out"]
    assert by_role["in"]["param_names"] == ["tok_embeddings.weight"]
    assert by_role["out"]["param_names"] == ["output.weight"]
    assert len(by_role["hidden"]["params"]) == 7 * TINY.n_layers
    assert {r: g["base_lr"] for r, g in by_role.items()} == {
        "in": 0.02,
        "hidden": 0.0025,
        "out": 0.01,
    }
    assert all(g["lr"] == g["base_lr"] for g in opt.param_groups)
    assert [g["norm"] for g in opt.param_groups] == ["colnorm", "spectral", "sign"]
    assert by_role["hidden"]["ns_dtype"] == "float32"
    assert build_optimizer(model, cfg, "cuda").param_groups[1]["ns_dtype"] == "bfloat16"
    adam = build_optimizer(model, OptimConfig(name="adamw", adam_beta2=0.99), "cpu")
    assert adam.param_groups[0]["betas"] == (0.9, 0.99)


def test_partition_assertion_fires() -> None:
    model = _model()
    groups = param_groups(model, OptimConfig())
    bad = [dict(g) for g in groups]
    bad[1] = {**bad[1], "params": bad[1]["params"][1:]}
    with pytest.raises(
        ValueError, match=r"layers\.0\.attention\.wq\.weight is in no optimizer group"
    ):
        check_partition(model, bad)
    dup = [dict(g) for g in groups]
    dup[2] = {**dup[2], "params": dup[2]["params"] + dup[0]["params"]}
    with pytest.raises(ValueError, match="exactly one"):
        check_partition(model, dup)
    model.register_parameter("extra_gain", nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match=r"extra_gain has shape \(4,\)"):
        build_optimizer(model, OptimConfig(), "cpu")
    del model.output
    with pytest.raises(ValueError, match="group 'out'"):
        param_groups(model, OptimConfig())


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(lr=0.01, momentum=0.9, nesterov=True),
        OptimConfig(name="adamw", lr=1e-3),
        OptimConfig(name="adam_atan2", lr=1e-3),
    ],
    ids=["scion", "adamw", "adam_atan2"],
)
def test_state_dict_round_trip_resumes_exactly(cfg: OptimConfig) -> None:
    batches = [_batch(seed=s, batch=2) for s in range(4)]

    def run(model: Transformer, opt: torch.optim.Optimizer, steps: list[torch.Tensor]) -> None:
        for idx in steps:
            opt.zero_grad()
            _loss(model, idx).backward()
            opt.step()

    straight = _model()
    run(straight, build_optimizer(straight, cfg, "cpu"), batches)
    first = _model()
    opt = build_optimizer(first, cfg, "cpu")
    run(first, opt, batches[:2])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, "cpu")
    opt2.load_state_dict(saved["optim"])
    run(resumed, opt2, batches[2:])
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
