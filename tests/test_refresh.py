"""AdaptiveRefresh on its own (fed cosines), and through GaLoreProjector (fed gradients)."""

import pytest
import torch

from qgl.optim.refresh import AdaptiveRefresh


def _run(refresh: AdaptiveRefresh, steps: int, cos_at) -> list[int]:
    """Drive the schedule for `steps` layer steps; returns the gap after each refresh."""
    gaps = []
    for step in range(steps):
        if refresh.due(step):
            refresh.record(step, None if refresh.svd_count == 0 else cos_at(step), 0.001)
            gaps.append(refresh.gap)
    return gaps


def test_stable_subspace_lengthens_the_gap_and_clears_the_queue():
    r = AdaptiveRefresh(update_proj_gap=10, cos_threshold=0.4, gamma_proj=2, queue_size=3)
    gaps = _run(r, 400, lambda step: 0.9)
    # step 0: no cosine; 10, 20, 30 fill the queue -> gap 20 from 30, queue cleared; and so on.
    assert r.refresh_steps == [0, 10, 20, 30, 50, 70, 90, 130, 170, 210, 290, 370]
    assert gaps == [10, 10, 10, 20, 20, 20, 40, 40, 40, 80, 80, 80]
    assert r.svd_count == 12 and r.galore_svds(400) == 40
    assert r.next_refresh == 450 and r.last_cos == 0.9 and r.queue == [0.9, 0.9]
    assert r.frozen  # 80 >= 8 x 10
    assert r.svd_seconds == pytest.approx(0.012)


def test_moving_subspace_keeps_the_fixed_schedule():
    r = AdaptiveRefresh(update_proj_gap=10, cos_threshold=0.4, gamma_proj=2, queue_size=3)
    gaps = _run(r, 400, lambda step: 0.2)
    assert set(gaps) == {10} and r.refresh_steps == list(range(0, 400, 10))
    assert r.svd_count == r.galore_svds(400) == 40 and not r.frozen


def test_threshold_is_on_the_mean_of_a_full_queue():
    r = AdaptiveRefresh(update_proj_gap=5, cos_threshold=0.5, gamma_proj=3, queue_size=2)
    r.record(0, None, 0.0)
    r.record(5, 0.9, 0.0)  # queue [0.9]: not full
    assert r.gap == 5
    r.record(10, 0.05, 0.0)  # mean 0.475 < 0.5
    assert r.gap == 5 and r.queue == [0.9, 0.05]
    r.record(15, 0.1, 0.0)  # sliding window: [0.05, 0.1]
    r.record(20, 0.9, 0.0)  # [0.1, 0.9]: mean exactly 0.5 >= 0.5
    assert r.gap == 15 and r.queue == [] and r.next_refresh == 35


def test_max_gap_caps_and_freezes():
    r = AdaptiveRefresh(update_proj_gap=10, gamma_proj=2, queue_size=1, max_gap=35)
    _run(r, 300, lambda step: 1.0)
    assert r.gap == 35 and r.frozen and r.frozen_gap == 80
    assert r.refresh_steps[:5] == [0, 10, 30, 65, 100]


def test_small_gamma_still_grows_a_gap_of_one():
    r = AdaptiveRefresh(update_proj_gap=1, gamma_proj=1.5, queue_size=1)
    _run(r, 3, lambda step: 1.0)
    assert r.gap > 1


def test_not_adaptive_keeps_the_gap_but_reports_cos():
    r = AdaptiveRefresh(update_proj_gap=10, adaptive=False, queue_size=1)
    _run(r, 100, lambda step: 1.0)
    assert r.gap == 10 and r.svd_count == 10 and r.last_cos == 1.0 and r.queue == []


def test_due_catches_up_after_skipped_steps():
    r = AdaptiveRefresh(update_proj_gap=10)
    assert r.due(0)
    r.record(0, None, 0.0)
    assert not r.due(9) and r.due(10) and r.due(13)


def test_galore_svds():
    r = AdaptiveRefresh(update_proj_gap=200)
    assert [r.galore_svds(s) for s in (0, 1, 200, 201, 1000)] == [0, 1, 1, 2, 5]


def test_state_dict_round_trip_continues_identically():
    a = AdaptiveRefresh(update_proj_gap=10, cos_threshold=0.4, gamma_proj=2, queue_size=3)
    cos_at = lambda step: 0.3 + 0.5 * ((step // 10) % 2)
    _run(a, 75, cos_at)
    sd = a.state_dict()
    assert all(isinstance(v, (int, float, bool, list, type(None))) for v in sd.values())
    b = AdaptiveRefresh()  # different configuration: the state's wins
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    for step in range(75, 400):
        assert a.due(step) == b.due(step)
        if a.due(step):
            a.record(step, cos_at(step), 0.0)
            b.record(step, cos_at(step), 0.0)
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"update_proj_gap": 0}, "update_proj_gap"),
    ({"cos_threshold": 1.5}, "cos_threshold"),
    ({"cos_threshold": -0.1}, "cos_threshold"),
    ({"gamma_proj": 0.5}, "gamma_proj"),
    ({"queue_size": 0}, "queue_size"),
    ({"update_proj_gap": 10, "max_gap": 5}, "max_gap"),
    ({"metric": "angle"}, r"unknown refresh_metric 'angle'.*leading, subspace"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveRefresh(**kwargs)


# -- through the projector: gradients from a fixed and from a rotating subspace ------------------

def _orthonormal(k: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, r)).Q


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_projector_fixed_subspace_lengthens_the_gap(shape):
    from qgl.optim.projector import GaLoreProjector

    m, n = shape
    u, v = _orthonormal(m, 8), _orthonormal(n, 8)
    base = torch.tensor([10.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0])
    refresh = AdaptiveRefresh(update_proj_gap=10, cos_threshold=0.4, gamma_proj=2, queue_size=3)
    proj = GaLoreProjector(shape, rank=4, refresh=refresh)
    gaps = []
    for step in range(400):
        s = base * (1 + 0.1 * torch.rand(8))  # the spectrum moves, the subspace does not
        g = u @ torch.diag(s) @ v.T + 1e-4 * torch.randn(m, n)
        if proj.maybe_refresh(g, step):
            gaps.append(refresh.gap)
        assert proj.project(g).shape == proj.low_shape
    assert gaps == [10, 10, 10, 20, 20, 20, 40, 40, 40, 80, 80, 80]
    assert refresh.refresh_steps == [0, 10, 20, 30, 50, 70, 90, 130, 170, 210, 290, 370]
    assert refresh.svd_count == 12 < refresh.galore_svds(400) == 40
    assert refresh.last_cos > 0.999 and refresh.frozen


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_projector_rotating_subspace_keeps_the_schedule(shape):
    from qgl.optim.projector import GaLoreProjector

    m, n = shape
    refresh = AdaptiveRefresh(update_proj_gap=10, cos_threshold=0.4, gamma_proj=2, queue_size=3)
    proj = GaLoreProjector(shape, rank=4, refresh=refresh)
    s = torch.tensor([10.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0])
    cosines = []
    for step in range(400):
        if refresh.due(step):  # a fresh random subspace at every refresh
            g = _orthonormal(m, 8) @ torch.diag(s) @ _orthonormal(n, 8).T
        assert proj.maybe_refresh(g, step) == (step % 10 == 0)
        if step % 10 == 0 and step > 0:
            cosines.append(refresh.last_cos)
    assert refresh.gap == 10 and refresh.refresh_steps == list(range(0, 400, 10))
    assert refresh.svd_count == refresh.galore_svds(400) == 40 and not refresh.frozen
    assert max(cosines) < 0.9 and sum(cosines) / len(cosines) < 0.3


# -- failed SVDs and the refresh metric ---------------------------------------------------------

def test_record_failure_keeps_the_gap_and_retries():
    r = AdaptiveRefresh(update_proj_gap=10, queue_size=2, metric="subspace")
    r.record(0, None, 0.1)
    r.record_failure(10)
    assert r.svd_failures == 1 and r.svd_count == 1 and r.next_refresh == 20 and r.queue == []
    r.record_failure(20, retry_in=1)
    assert r.next_refresh == 21 and r.gap == 10
    with pytest.raises(ValueError, match="retry_in"):
        r.record_failure(21, retry_in=0)
    b = AdaptiveRefresh()
    b.load_state_dict(r.state_dict())
    assert b.metric == "subspace" and b.svd_failures == 2 and b.state_dict() == r.state_dict()
    old = r.state_dict()
    for key in ("metric_subspace", "svd_failures"):  # a checkpoint from before these existed
        old.pop(key)
    b.load_state_dict(old)
    assert b.metric == "leading" and b.svd_failures == 0


def _swapping_top_pair(m: int, n: int, steps: int):
    """Gradients of one fixed rank-4 subspace whose top two singular values (nearly equal) trade
    places at every step: the leading vector flips between two directions, the subspace stays."""
    u, v = _orthonormal(m, 6), _orthonormal(n, 6)
    for step in range(steps):
        eps = 0.05 if step % 2 else -0.05
        s = torch.tensor([5.0 + eps, 5.0 - eps, 3.0, 2.0, 0.1, 0.1])
        yield u @ torch.diag(s) @ v.T


def _stable_lead_rotating_rest(m: int, n: int, steps: int, seed: int = 0):
    """A dominant, fixed first direction; the other three of the rank-4 subspace are new random
    directions (orthogonal to the first) at every step."""
    gen = torch.Generator().manual_seed(seed)
    u1, v1 = _orthonormal(m, 1), _orthonormal(n, 1)
    for _ in range(steps):
        u = torch.linalg.qr(torch.cat([u1, torch.randn(m, 5, generator=gen)], dim=1)).Q
        v = torch.linalg.qr(torch.cat([v1, torch.randn(n, 5, generator=gen)], dim=1)).Q
        yield u @ torch.diag(torch.tensor([10.0, 3.0, 2.5, 2.0, 0.1, 0.1])) @ v.T


def _drive(metric: str, stream, shape) -> tuple[AdaptiveRefresh, int | None]:
    """Feed a gradient stream to a projector; (its refresh, the first step at which it froze)."""
    from qgl.optim.projector import GaLoreProjector

    refresh = AdaptiveRefresh(update_proj_gap=1, cos_threshold=0.4, gamma_proj=2, queue_size=2,
                              metric=metric)
    proj = GaLoreProjector(shape, rank=4, refresh=refresh)
    frozen_at = None
    for step, g in enumerate(stream):
        proj.maybe_refresh(g, step)
        if frozen_at is None and refresh.frozen:
            frozen_at = step
    return refresh, frozen_at


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_subspace_metric_freezes_a_layer_whose_leading_vector_only_swaps(shape):
    steps = 120
    lead, lead_frozen = _drive("leading", _swapping_top_pair(*shape, steps), shape)
    sub, sub_frozen = _drive("subspace", _swapping_top_pair(*shape, steps), shape)
    # Leading: the top vector flips at every refresh (gap 1, odd-even), |cos| ~ 0, never stable.
    assert lead.last_cos < 0.1 and lead.gap == 1 and lead_frozen is None and lead.svd_count == steps
    # Subspace: the same 4 directions every time -> 1.0 -> the gap doubles, frozen (gap >= 8) early.
    assert sub.last_cos == pytest.approx(1.0, abs=1e-4)
    assert sub_frozen is not None and sub_frozen < 20 and sub.svd_count < 20


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_subspace_metric_keeps_refreshing_a_layer_whose_rest_rotates(shape):
    steps = 120
    lead, lead_frozen = _drive("leading", _stable_lead_rotating_rest(*shape, steps), shape)
    sub, sub_frozen = _drive("subspace", _stable_lead_rotating_rest(*shape, steps), shape)
    # Leading: the dominant vector never moves -> |cos| ~ 1 -> frozen early, although 3 of the 4
    # directions it projects on are stale. Subspace: ~1/4 + chance overlap -> never stable.
    assert lead.last_cos > 0.999 and lead_frozen is not None and lead_frozen < 20
    assert sub.last_cos < 0.4 and sub.gap == 1 and sub_frozen is None and sub.svd_count == steps
