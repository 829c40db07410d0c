"""GaLoreProjector: sides and shapes, exactness in fp32, INT4 error bound, checkpoints, errors."""

import io
import math

import pytest
import torch

from qgl.optim.projector import GaLoreProjector
from qgl.optim.refresh import AdaptiveRefresh
from qgl.optim.svd import top_singular_vectors
from qgl.quant.int4 import Int4Tensor


def _rank_r_reconstruction(g: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u[:, :r] @ torch.diag(s[:r]) @ vh[:r]).float()


@pytest.mark.parametrize(("shape", "side", "basis_shape", "low_shape"), [
    ((64, 32), "right", (8, 32), (64, 8)),
    ((32, 64), "left", (32, 8), (8, 64)),
    ((40, 40), "right", (8, 40), (40, 8)),
])
@pytest.mark.parametrize("quantize", [False, True])
def test_sides_and_shapes(shape, side, basis_shape, low_shape, quantize):
    proj = GaLoreProjector(shape, rank=8, quantize=quantize)
    assert proj.side == side and proj.basis_shape == basis_shape and proj.low_shape == low_shape
    g = torch.randn(shape)
    assert proj.maybe_refresh(g, 0) and not proj.maybe_refresh(g, 1)
    low = proj.project(g)
    assert low.shape == low_shape and low.dtype == torch.float32
    back = proj.project_back(low)
    assert back.shape == shape and back.dtype == torch.float32
    assert proj.basis().shape == basis_shape


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
@pytest.mark.parametrize("rank", [1, 5, 32])
def test_fp32_round_trip_is_the_rank_r_svd_reconstruction(shape, rank):
    g = torch.randn(shape)
    proj = GaLoreProjector(shape, rank=rank, scale=0.25, quantize=False, svd_method="full")
    proj.maybe_refresh(g, 0)
    back = proj.project_back(proj.project(g))
    torch.testing.assert_close(back, 0.25 * _rank_r_reconstruction(g, rank), atol=2e-5, rtol=1e-4)
    if rank == min(shape):  # a full basis: the identity
        torch.testing.assert_close(back, 0.25 * g, atol=2e-5, rtol=1e-4)


def _int4_error_bound(p: torch.Tensor, group_size: int) -> float:
    """A-priori bound on ||dequant(quant(P)) - P||_F: round-to-nearest errs by at most half a
    step, (max - min) / 15 / 2, on each element of a group."""
    flat = p.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), group_size):
        grp = flat[start:start + group_size]
        half_step = (grp.max() - grp.min()).item() / 15 / 2
        total += grp.numel() * half_step**2
    return math.sqrt(total)


@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])
def test_int4_round_trip_within_the_quantization_bound(shape):
    g = torch.randn(shape)
    rank, scale, group = 16, 0.25, 256
    fp = GaLoreProjector(shape, rank, scale=scale, quantize=False)
    q4 = GaLoreProjector(shape, rank, scale=scale, quantize=True, group_size=group)
    fp.maybe_refresh(g, 0)
    q4.maybe_refresh(g, 0)
    p = fp.basis()
    e = _int4_error_bound(p, group)
    assert (q4.basis() - p).norm().item() <= e * (1 + 1e-5)
    # The projections use the dequantized P.
    pq = q4.basis()
    expect_low = g @ pq.T if q4.side == "right" else pq.T @ g
    torch.testing.assert_close(q4.project(g), expect_low, atol=1e-4, rtol=1e-4)
    # ||G (Pq^T Pq - P^T P)|| <= ||G||_2 (2 e + e^2) since ||P||_2 = 1 (same on the left).
    err = (q4.project_back(q4.project(g)) - fp.project_back(fp.project(g))).norm().item()
    bound = scale * torch.linalg.matrix_norm(g, ord=2).item() * (2 * e + e * e)
    assert err <= bound * (1 + 1e-4), f"INT4 round-trip error {err:.4f} > bound {bound:.4f}"
    rel = err / fp.project_back(fp.project(g)).norm().item()
    assert rel < 0.25, f"relative INT4 round-trip error {rel:.3f}"


def test_bf16_gradient_gives_fp32_results():
    g = torch.randn(64, 32).bfloat16()
    proj = GaLoreProjector((64, 32), 4, quantize=True)
    proj.maybe_refresh(g, 0)
    low = proj.project(g)
    assert low.dtype == torch.float32 and proj.basis().dtype == torch.float32
    torch.testing.assert_close(low, g.float() @ proj.basis().T, atol=1e-4, rtol=1e-4)
    assert proj.project_back(low).dtype == torch.float32


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_float_basis_on_a_bf16_gradient_multiplies_16_bit_operands(shape):
    """Float P from a bf16 G (bf16 weights) is stored in bf16, the dtype both products use, with fp32
    accumulation (the INT4 path's and GaLore's numerics, at tensor-core speed); its leading vector
    stays fp32. The basis of an fp32 gradient stays fp32 and its products too."""
    g = torch.randn(shape).bfloat16()
    proj = GaLoreProjector(shape, 4, quantize=False, scale=0.5, svd_method="full")
    proj.maybe_refresh(g, 0)
    assert proj.tensors()["proj"].dtype == torch.bfloat16 and proj.tensors()["lead"].dtype == torch.float32
    exact_basis = top_singular_vectors(g, 4, proj.side, "full")
    assert torch.equal(proj.basis(), exact_basis.bfloat16().float())
    p16 = proj.basis()
    right = proj.side == "right"
    low = proj.project(g)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, g.float() @ p16.T if right else p16.T @ g.float(), atol=1e-5, rtol=1e-5)
    back = proj.project_back(low, factor=-2.0, out_dtype=torch.bfloat16)
    low16 = (low * -1.0).bfloat16().float()  # scale 0.5 x factor -2, then the operand rounding
    want = (low16 @ p16 if right else p16 @ low16).bfloat16()
    assert back.dtype == torch.bfloat16 and torch.equal(back, want)
    fp32 = GaLoreProjector(shape, 4, quantize=False, scale=0.5, svd_method="full")
    fp32.maybe_refresh(g.float(), 0)  # an fp32 gradient: P stays fp32, unrounded
    assert fp32.tensors()["proj"].dtype == torch.float32
    exact = fp32.project(g.float())
    torch.testing.assert_close(exact, g.float() @ exact_basis.T if right else exact_basis.T @ g.float())
    assert fp32.project_back(exact).dtype == torch.float32
    # A bf16-stored P still serves an fp32 gradient (e.g. a run resumed under another precision).
    torch.testing.assert_close(proj.project(g.float()), g.float() @ p16.T if right else p16.T @ g.float())


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [False, True])
def test_add_back_is_the_back_projection_added_in_place_with_one_rounding(shape, dtype, quantize):
    """weight += scale * factor * back(low) as one addmm_ in the weight's dtype: the same as the
    product of the operands rounded to that dtype, accumulated in fp32 and rounded once."""
    torch.manual_seed(0)
    g = torch.randn(shape).to(dtype)
    proj = GaLoreProjector(shape, 4, quantize=quantize, scale=0.5)
    proj.maybe_refresh(g, 0)
    low = proj.project(g)
    w = torch.randn(shape).to(dtype)
    expected_w = w.clone()
    p = proj.basis().to(dtype).float()
    low_d = (low * (0.5 * -0.1)).to(dtype).float()
    back = low_d @ p if proj.side == "right" else p @ low_d
    want = (expected_w.float() + back).to(dtype)
    ptr = w.data_ptr()
    proj.add_back_(w, low, factor=-0.1)
    assert w.data_ptr() == ptr and w.dtype == dtype  # in place
    if dtype == torch.float32:
        torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(w, want)
    # The same update as the full-size back-projection added in fp32 (fp32 weights).
    if dtype == torch.float32:
        w2 = expected_w.clone()
        w2.add_(proj.project_back(low, factor=-0.1))
        torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected a weight of shape"):
        proj.add_back_(torch.zeros(shape[0] + 1, shape[1]), low)
    with pytest.raises(ValueError, match="expected a low-rank tensor"):
        proj.add_back_(w, low.T.contiguous() if low.shape[0] != low.shape[1] else low[:1])


def test_nbytes():
    q4 = GaLoreProjector((512, 256), 64, quantize=True)
    fp = GaLoreProjector((512, 256), 64, quantize=False)
    assert q4.nbytes == fp.nbytes == 0
    g = torch.randn(512, 256)
    q4.maybe_refresh(g, 0)
    fp.maybe_refresh(g, 0)
    lead = 256 * 4
    assert fp.nbytes == 64 * 256 * 4 + lead
    half = GaLoreProjector((512, 256), 64, quantize=False)
    half.maybe_refresh(g.bfloat16(), 0)
    assert half.nbytes == 64 * 256 * 2 + lead  # P in the bf16 gradient's dtype, lead in fp32
    n_groups = 64 * 256 // 256
    assert q4.nbytes == 64 * 256 // 2 + 2 * 4 * n_groups + lead  # codes + fp32 scale and zero
    assert q4.nbytes * 5 < fp.nbytes


def _sample(step: int, base: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return base + (0.3 * torch.randn(base.shape, generator=gen)).to(base.dtype)


@pytest.mark.parametrize(("shape", "quantize", "method", "dtype"), [
    ((64, 32), True, "full", torch.float32), ((32, 64), True, "randomized", torch.float32),
    ((64, 32), False, "randomized", torch.float32), ((32, 64), False, "full", torch.bfloat16),
])
def test_state_dict_round_trip_mid_run(shape, quantize, method, dtype):
    base = torch.randn(shape).to(dtype)
    make = lambda: GaLoreProjector(shape, 4, quantize=quantize, svd_method=method, seed=3,
                                   refresh=AdaptiveRefresh(update_proj_gap=5, queue_size=2))
    a = make()
    for step in range(23):
        a.maybe_refresh(_sample(step, base), step)
    assert a.refresh.gap > 5  # the gap changed before the checkpoint

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = GaLoreProjector(shape, 4, quantize=quantize, svd_method=method, seed=3)  # default refresh
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.basis(), b.basis())
    assert {k: v.dtype for k, v in a.tensors().items()} == {k: v.dtype for k, v in b.tensors().items()}

    for step in range(23, 120):
        g = _sample(step, base)
        assert a.maybe_refresh(g, step) == b.maybe_refresh(g, step)
        la, lb = a.project(g), b.project(g)
        assert torch.equal(la, lb)
        assert torch.equal(a.project_back(la), b.project_back(lb))
    sa, sb = a.state_dict(), b.state_dict()
    ra, rb = sa.pop("refresh"), sb.pop("refresh")
    ra.pop("svd_seconds"), rb.pop("svd_seconds")  # wall time differs, everything else must not
    assert sa.keys() == sb.keys() and ra == rb
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb[k]), k
    assert a.refresh.svd_count < a.refresh.galore_svds(120)


def test_state_dict_has_no_strings_and_survives_a_dtype_cast():
    # torch.optim.Optimizer.load_state_dict casts state tensors to the parameter's dtype and
    # turns strings into garbage; the projector's state must come back usable from that.
    proj = GaLoreProjector((64, 32), 4, quantize=True)
    g = torch.randn(64, 32)
    proj.maybe_refresh(g, 0)
    sd = proj.state_dict()
    flat = list(sd.values()) + list(sd["refresh"].values())
    assert not any(isinstance(v, str) for v in flat)
    assert isinstance(sd["proj_packed"], torch.Tensor) and sd["proj_packed"].dtype == torch.uint8
    cast = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    other = GaLoreProjector((64, 32), 4, quantize=True)
    other.load_state_dict(cast)
    assert torch.equal(other.state_dict()["proj_packed"], sd["proj_packed"])  # codes survive exactly
    torch.testing.assert_close(other.project(g), proj.project(g), atol=0.05, rtol=0.02)


def test_int4_storage_is_an_int4_tensor():
    proj = GaLoreProjector((64, 32), 4, quantize=True, group_size=64)
    proj.maybe_refresh(torch.randn(64, 32), 0)
    assert isinstance(proj._p, Int4Tensor) and proj._p.group_size == 64


def test_bad_input():
    with pytest.raises(ValueError, match=r"rank 33 is larger than the matrix \(64 x 32\)"):
        GaLoreProjector((64, 32), 33)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        GaLoreProjector((64, 32), 0)
    with pytest.raises(ValueError, match="2-D"):
        GaLoreProjector((4, 5, 6), 2)
    with pytest.raises(ValueError, match="2-D"):
        GaLoreProjector((64,), 2)
    with pytest.raises(ValueError, match=r"unknown svd.method 'lanczos'.*full.*randomized"):
        GaLoreProjector((64, 32), 4, svd_method="lanczos")
    proj = GaLoreProjector((64, 32), 4)
    with pytest.raises(RuntimeError, match="maybe_refresh"):
        proj.project(torch.randn(64, 32))
    with pytest.raises(ValueError, match=r"shape \(64, 32\)"):
        proj.maybe_refresh(torch.randn(32, 64), 0)
    proj.maybe_refresh(torch.randn(64, 32), 0)
    with pytest.raises(ValueError, match="low-rank"):
        proj.project_back(torch.randn(4, 32))
    with pytest.raises(ValueError, match="cannot load"):
        GaLoreProjector((64, 32), 8).load_state_dict(proj.state_dict())


@pytest.mark.parametrize("side_shape", [(96, 64), (64, 96)])
def test_decoded_shares_one_decoding_of_the_int4_basis(monkeypatch, side_shape):
    """Inside `decoded`, project and project_back multiply by one decoding of P (the GPU's dense
    path decodes it per product); outside, nothing is kept. The decoding is simulated on CPU,
    where the kernels never decode (the references compute in fp32)."""
    from qgl.kernels.mm16 import mm16

    torch.manual_seed(0)
    g = torch.randn(*side_shape).bfloat16()
    proj = GaLoreProjector(side_shape, 8, scale=0.5, quantize=True, group_size=32)
    proj.maybe_refresh(g, 0)
    calls = []

    def dense_basis(self, like):
        calls.append(like.dtype)
        return self.dequantize(torch.bfloat16)

    monkeypatch.setattr(Int4Tensor, "dense_basis", dense_basis)
    p16 = proj._p.dequantize(torch.bfloat16)
    with proj.decoded(g):
        low = proj.project(g)
        back = proj.project_back(low, -2.0, torch.bfloat16)
    assert calls == [torch.bfloat16] and proj._decoded is None
    right = proj.side == "right"
    assert torch.equal(low, mm16(g, p16.T) if right else mm16(p16.T, g))
    low16 = (low * -1.0).bfloat16()  # scale 0.5 x factor -2
    assert torch.equal(back, mm16(low16, p16, torch.bfloat16) if right else mm16(p16, low16, torch.bfloat16))
    assert proj.project(g).dtype == torch.float32 and len(calls) == 1  # outside: the kernels' own path


def test_decoded_changes_nothing_where_the_kernels_do_not_decode():
    torch.manual_seed(0)
    g = torch.randn(96, 64)
    proj = GaLoreProjector((96, 64), 8, quantize=True, group_size=32)
    proj.maybe_refresh(g, 0)
    low, back = proj.project(g), proj.project_back(proj.project(g))
    with proj.decoded(g):
        assert proj._decoded is None  # CPU: the references
        assert torch.equal(proj.project(g), low) and torch.equal(proj.project_back(low), back)


# -- SVD failure: fallback to the previous P (or a random one at the first refresh) --------------

def test_svd_failure_keeps_the_previous_basis_and_warns_naming_the_layer():
    proj = GaLoreProjector((64, 32), 4, quantize=True, name="layers.3.mlp.up", svd_method="full",
                           refresh=AdaptiveRefresh(update_proj_gap=5))
    g = torch.randn(64, 32)
    assert proj.maybe_refresh(g, 0)
    before = proj.basis().clone()
    bad = torch.randn(64, 32)
    bad[7, 3] = float("nan")  # makes torch.linalg.svd raise (LinAlgError: non-finite input)
    match = r"SVD of layers\.3\.mlp\.up failed at its step 5 .*keeping its previous"
    with pytest.warns(RuntimeWarning, match=match):
        assert proj.maybe_refresh(bad, 5)
    assert torch.equal(proj.basis(), before)
    r = proj.refresh
    assert r.svd_failures == 1 and r.svd_count == 1 and r.queue == [] and r.next_refresh == 10
    assert proj.maybe_refresh(g, 10) and r.svd_count == 2  # the next scheduled refresh succeeds
    assert r.last_cos == pytest.approx(1.0, abs=1e-5)  # compared with the basis kept, not the failed one


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_svd_failure_of_an_overflowing_gradient(method):
    # Finite but ~1e38: the SVD overflows (LinAlgError from the full SVD, a non-finite basis from
    # the randomized one): the fallback catches both.
    proj = GaLoreProjector((48, 24), 4, quantize=False, svd_method=method,
                           refresh=AdaptiveRefresh(update_proj_gap=2))
    proj.maybe_refresh(torch.randn(48, 24), 0)
    before = proj.basis().clone()
    with pytest.warns(RuntimeWarning, match=r"SVD of a projected layer of shape \(48, 24\) failed"):
        proj.maybe_refresh(torch.randn(48, 24) * 3e38, 2)
    assert torch.equal(proj.basis(), before) and proj.refresh.svd_failures == 1


def test_svd_failure_at_the_first_refresh_takes_a_random_orthonormal_basis(monkeypatch):
    import qgl.optim.projector as projector_module

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    proj = GaLoreProjector((32, 64), 4, quantize=False, name="attn.q", seed=1, svd_method="full",
                           refresh=AdaptiveRefresh(update_proj_gap=50))
    g = torch.randn(32, 64)
    with monkeypatch.context() as mp:
        mp.setattr(projector_module, "top_singular_vectors", failing)
        match = r"SVD of attn\.q failed at its first refresh, step 0.*random"
        with pytest.warns(RuntimeWarning, match=match):
            assert proj.maybe_refresh(g, 0)
    p = proj.basis()
    assert p.shape == (32, 4) and torch.isfinite(p).all()
    torch.testing.assert_close(p.T @ p, torch.eye(4), atol=1e-5, rtol=0)
    assert proj.project(g).shape == (4, 64)  # training goes on
    assert proj.refresh.next_refresh == 1 and proj.refresh.svd_failures == 1
    assert proj.maybe_refresh(g, 1)  # tried again at the next step, successfully
    assert proj.refresh.svd_count == 1 and proj.refresh.last_cos is None  # nothing real to compare with
    torch.testing.assert_close(proj.basis(), top_singular_vectors(g, 4, "left"), atol=1e-5, rtol=0)


def test_the_optimizer_names_the_layer_in_the_warning():
    from qgl.optim import QGaLoreAdamW

    w = torch.nn.Parameter(torch.randn(48, 32))
    opt = QGaLoreAdamW([{"params": [w], "rank": 4, "names": ["blocks.0.attn.k"], "update_proj_gap": 1}],
                       lr=1e-3, check_finite=False)
    w.grad = torch.randn(48, 32)
    opt.step()
    w.grad = torch.randn(48, 32) * 3e38
    with pytest.warns(RuntimeWarning, match=r"SVD of blocks\.0\.attn\.k failed at its step 1"):
        opt.step()


# -- warm start and the subspace metric -----------------------------------------------------------

def test_randomized_refreshes_warm_start_from_the_stored_basis(monkeypatch):
    import qgl.optim.projector as projector_module

    seen = []
    real = projector_module.top_singular_vectors

    def spy(g, rank, side, method, **kwargs):
        seen.append(kwargs.get("init"))
        return real(g, rank, side, method, **kwargs)

    monkeypatch.setattr(projector_module, "top_singular_vectors", spy)
    proj = GaLoreProjector((64, 32), 4, svd_method="randomized", refresh=AdaptiveRefresh(update_proj_gap=1))
    proj.maybe_refresh(torch.randn(64, 32), 0)
    stored = proj.basis()
    proj.maybe_refresh(torch.randn(64, 32), 1)
    assert seen[0] is None and torch.equal(seen[1], stored)  # first cold, then from the INT4 P


@pytest.mark.parametrize("quantize", [True, False])
def test_subspace_metric_reads_one_for_an_unchanged_subspace_even_in_int4(quantize):
    proj = GaLoreProjector((64, 32), 6, quantize=quantize, svd_method="full",
                           refresh=AdaptiveRefresh(update_proj_gap=1, metric="subspace"))
    g = torch.randn(64, 32)
    proj.maybe_refresh(g, 0)
    proj.maybe_refresh(2.0 * g, 1)  # same subspace
    assert proj.refresh.last_cos == pytest.approx(1.0, abs=1e-5)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    proj.maybe_refresh(u[:, 6:12] @ vh[6:12], 2)  # the next six directions: orthogonal to the first
    assert proj.refresh.last_cos == pytest.approx(0.0, abs=0.02 if quantize else 1e-5)
