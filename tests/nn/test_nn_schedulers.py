"""Learning-rate schedules: torch's rates step by step, state dicts both ways, errors.

The schedules do torch's float arithmetic operation by operation, so the rates must be
equal, not close: a test with a tolerance would let an algebraically equal but differently
rounded formula (a closed form for the cosine, say) pass."""
import copy
import math

import numpy as np
import pytest

from microtile import nn
from microtile.nn import lr_scheduler as sched

torch = pytest.importorskip("torch")
tsched = torch.optim.lr_scheduler

LRS = (0.1, 0.03)       # two groups, so per-group rates are exercised


def pair():
    mine = nn.SGD([{"params": [nn.Parameter(np.zeros(2))], "lr": LRS[0]},
                   {"params": [nn.Parameter(np.zeros(3))], "lr": LRS[1]}], lr=1.0, momentum=0.9)
    theirs = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": LRS[0]},
                              {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": LRS[1]}],
                             lr=1.0, momentum=0.9)
    return mine, theirs


EPOCH_CASES = [
    ("StepLR", dict(step_size=3)),
    ("StepLR", dict(step_size=1, gamma=0.7)),
    ("ExponentialLR", dict(gamma=0.9)),
    ("CosineAnnealingLR", dict(T_max=7)),
    ("CosineAnnealingLR", dict(T_max=4, eta_min=1e-3)),    # past T_max: back up, and again
]


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("name,kw", EPOCH_CASES)
def test_epoch_schedules_match_torch(name, kw):
    mine, theirs = pair()
    s = getattr(sched, name)(mine, **kw)
    t = getattr(tsched, name)(theirs, **kw)
    assert s.get_last_lr() == t.get_last_lr() == list(LRS)
    assert [g["initial_lr"] for g in mine.param_groups] == list(LRS)
    seen = set()
    for _ in range(25):
        theirs.step()       # torch warns when the schedule steps before the optimizer
        s.step()
        t.step()
        assert s.get_last_lr() == t.get_last_lr() == lrs_of(mine) == lrs_of(theirs)
        seen.add(tuple(s.get_last_lr()))
    assert len(seen) > 3    # the schedule does move
    assert s.last_epoch == 25


def test_cosine_follows_external_changes_like_torch():
    mine, theirs = pair()
    s = sched.CosineAnnealingLR(mine, T_max=10)
    t = tsched.CosineAnnealingLR(theirs, T_max=10)
    for k in range(8):
        theirs.step()
        if k == 3:
            mine.param_groups[0]["lr"] *= 0.5
            theirs.param_groups[0]["lr"] *= 0.5
        s.step()
        t.step()
        assert s.get_last_lr() == t.get_last_lr()


def test_cosine_closed_form():
    # Independent of torch: the recursion tracks eta_min + (base - eta_min)(1 + cos(pi e/T))/2.
    mine, _ = pair()
    s = sched.CosineAnnealingLR(mine, T_max=6, eta_min=0.01)
    for e in range(1, 13):
        s.step()
        for base, lr in zip(LRS, s.get_last_lr()):
            want = 0.01 + (base - 0.01) * (1 + math.cos(math.pi * e / 6)) / 2
            # Each recursive step rounds a handful of operations on numbers up to base.
            assert abs(lr - want) <= 16 * np.finfo(float).eps * e * base


PLATEAU_CASES = [
    dict(),
    dict(mode="max", factor=0.5, patience=1, threshold=0.05, threshold_mode="abs"),
    dict(patience=0, cooldown=2, min_lr=[0.05, 1e-3]),
    dict(patience=2, factor=0.2, min_lr=0.02, eps=1e-3),
]

# A fake metric: improves, plateaus, gets worse, wobbles inside the threshold, improves.
METRIC = ([5.0, 4.0, 3.0] + [3.0] * 4 + [3.5, 2.99995, 2.9, 2.9, 2.9] + [float("nan")]
          + [2.0, 1.0] + [1.0] * 24)


@pytest.mark.parametrize("kw", PLATEAU_CASES)
def test_plateau_matches_torch(kw):
    mine, theirs = pair()
    s = sched.ReduceLROnPlateau(mine, **kw)
    t = tsched.ReduceLROnPlateau(theirs, **kw)
    metric = [-m for m in METRIC] if kw.get("mode") == "max" else METRIC
    reductions = 0
    for m in metric:
        before = lrs_of(mine)
        s.step(m)
        t.step(m)
        assert s.get_last_lr() == t.get_last_lr() == lrs_of(mine) == lrs_of(theirs)
        assert (s.num_bad_epochs, s.cooldown_counter) == (t.num_bad_epochs, t.cooldown_counter)
        assert s.best == t.best
        reductions += lrs_of(mine) != before
    assert reductions >= 1


def test_plateau_by_hand():
    # patience 2: the 3rd epoch in a row without improvement cuts the rate.
    mine, _ = pair()
    s = sched.ReduceLROnPlateau(mine, patience=2, factor=0.5, threshold=0.0)
    for m, lr0 in [(1.0, 0.1), (1.0, 0.1), (1.0, 0.1), (1.0, 0.05), (0.5, 0.05), (0.6, 0.05)]:
        s.step(m)
        assert s.get_last_lr()[0] == lr0
    assert s.best == 0.5


def to_numpy_sd(sd):
    return copy.deepcopy({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in sd.items()})


@pytest.mark.parametrize("name,kw", EPOCH_CASES + [("ReduceLROnPlateau", PLATEAU_CASES[2])])
def test_state_dict_both_ways(name, kw):
    step = ((lambda s, k: s.step(METRIC[k])) if name == "ReduceLROnPlateau"
            else (lambda s, k: s.step()))
    mine, theirs = pair()
    s = getattr(sched, name)(mine, **kw)
    t = getattr(tsched, name)(theirs, **kw)
    for k in range(9):
        theirs.step()
        step(s, k)
        step(t, k)
    sd = s.state_dict()
    assert sd == t.state_dict()
    # Ours into torch and torch's into ours, in fresh pairs whose optimizers got the rates
    # from the optimizer state dicts; then all three continue alike.
    mine2, theirs2 = pair()
    theirs3 = pair()[1]
    s2 = getattr(sched, name)(mine2, **kw)
    t2 = getattr(tsched, name)(theirs2, **kw)
    t3 = getattr(tsched, name)(theirs3, **kw)
    for opt, src in ((mine2, mine), (theirs2, theirs), (theirs3, theirs)):
        for g, gs in zip(opt.param_groups, src.param_groups):
            g["lr"] = gs["lr"]
            g.setdefault("initial_lr", gs.get("initial_lr"))
    s2.load_state_dict(to_numpy_sd(t.state_dict()))
    t3.load_state_dict(copy.deepcopy(sd))
    t2.load_state_dict(t.state_dict())
    for k in range(9, 20):
        for o in (theirs, theirs2, theirs3):
            o.step()
        for x in (s, t, s2, t2, t3):
            step(x, k)
        assert (s.get_last_lr() == t.get_last_lr() == s2.get_last_lr() == t2.get_last_lr()
                == t3.get_last_lr())


def test_state_dict_errors_change_nothing():
    mine, _ = pair()
    s = sched.StepLR(mine, step_size=2)
    s.step()
    before = s.state_dict()
    bad = [
        ({**before, "extra": 1}, ValueError, "unknown keys \\['extra'\\]"),
        ({k: v for k, v in before.items() if k != "gamma"}, ValueError,
         "missing keys \\['gamma'\\]"),
        ({**before, "step_size": 0}, ValueError, "step_size"),
        ({**before, "base_lrs": [0.1]}, ValueError, "base_lrs"),
        ({**before, "gamma": "x"}, TypeError, "gamma"),
        ({**before, "last_epoch": 2.5}, TypeError, "last_epoch"),
        ([1, 2], TypeError, "dict"),
    ]
    for d, exc, match in bad:
        with pytest.raises(exc, match=match):
            s.load_state_dict(d)
        assert s.state_dict() == before
    p, _ = pair()
    r = sched.ReduceLROnPlateau(p)
    rsd = r.state_dict()
    with pytest.raises(ValueError, match="mode"):
        r.load_state_dict({**rsd, "mode": "up"})
    with pytest.raises(ValueError, match="mode_worse"):
        r.load_state_dict({**rsd, "mode": "max"})
    assert r.state_dict() == rsd


def test_constructor_errors():
    opt, topt = pair()
    with pytest.raises(TypeError, match="optimizer"):
        sched.StepLR(topt, step_size=2)
    with pytest.raises(ValueError, match="step_size"):
        sched.StepLR(opt, step_size=0)
    with pytest.raises(TypeError, match="step_size"):
        sched.StepLR(opt, step_size=2.0)
    with pytest.raises(ValueError, match="gamma"):
        sched.ExponentialLR(opt, gamma=float("nan"))
    with pytest.raises(ValueError, match="T_max"):
        sched.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match="eta_min"):
        sched.CosineAnnealingLR(opt, T_max=3, eta_min=-1.0)
    with pytest.raises(ValueError, match="factor"):
        sched.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match="mode"):
        sched.ReduceLROnPlateau(opt, mode="lowest")
    with pytest.raises(ValueError, match="threshold_mode"):
        sched.ReduceLROnPlateau(opt, threshold_mode="pct")
    with pytest.raises(ValueError, match="min_lr"):
        sched.ReduceLROnPlateau(opt, min_lr=[0.1])
    with pytest.raises(ValueError, match="patience"):
        sched.ReduceLROnPlateau(opt, patience=-1)
    # None of these touched the optimizer's rates.
    assert lrs_of(opt) == list(LRS)


def test_added_group_is_reported():
    opt, _ = pair()
    s = sched.StepLR(opt, step_size=2)
    opt.add_param_group({"params": [nn.Parameter(np.zeros(1))]})
    with pytest.raises(ValueError, match="groups"):
        s.step()


def test_optimizer_state_keeps_initial_lr():
    opt, _ = pair()
    sched.ExponentialLR(opt, gamma=0.5).step()
    sd = opt.state_dict()
    assert [g["initial_lr"] for g in sd["param_groups"]] == list(LRS)
    fresh, _ = pair()
    fresh.load_state_dict(sd)
    assert lrs_of(fresh) == [LRS[0] * 0.5, LRS[1] * 0.5]
    # A schedule made after the load keeps the first rate, as torch's does.
    s = sched.ExponentialLR(fresh, gamma=0.5)
    assert s.base_lrs == list(LRS)
