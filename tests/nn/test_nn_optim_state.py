"""Optimizers: parameter groups, every option against torch.optim step by step, state dicts
(to and from torch's), exact resumption, and the errors of groups and state dicts."""
import copy

import numpy as np
import pytest

from microtile import nn

torch = pytest.importorskip("torch")

F64 = np.float64

# (microtile class, torch name, options): every option of every optimizer at least once.
CASES = [
    (nn.SGD, "SGD", dict(lr=0.05)),
    (nn.SGD, "SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (nn.SGD, "SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    (nn.Adam, "Adam", dict()),
    (nn.Adam, "Adam", dict(lr=3e-2, betas=(0.3, 0.4), eps=1e-6, weight_decay=0.1)),
    (nn.Adam, "Adam", dict(lr=3e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (nn.AdamW, "AdamW", dict()),
    (nn.AdamW, "AdamW", dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)),
    (nn.AdaGrad, "Adagrad", dict()),
    (nn.AdaGrad, "Adagrad", dict(lr=0.5, eps=1e-3, weight_decay=0.1)),
    (nn.RMSprop, "RMSprop", dict()),
    (nn.RMSprop, "RMSprop", dict(lr=1e-3, alpha=0.9, eps=1e-5, weight_decay=0.1)),
    (nn.RMSprop, "RMSprop", dict(lr=1e-2, momentum=0.9)),
    (nn.RMSprop, "RMSprop", dict(lr=1e-2, centered=True)),
    (nn.RMSprop, "RMSprop", dict(lr=1e-2, alpha=0.3, momentum=0.5, centered=True,
                                 weight_decay=0.05)),
]
IDS = [f"{c[1]}-{i}" for i, c in enumerate(CASES)]

# 40000 elements: the threaded path of the kernels, with a ragged last chunk.
SHAPES = [(13, 7), (5,), (40000,)]
STEPS = 6


def make_pair(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    mine = [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in mine]
    return mine, theirs


def groups_of(params, kw, split):
    """The parameters as given to the constructor: a plain list, or two groups, the second
    with a learning rate of its own (so group options are shown to apply per group)."""
    if not split:
        return list(params)
    lr = kw.get("lr", 1e-2)
    return [{"params": params[:1]}, {"params": params[1:], "lr": lr * 0.5}]


def feed(rng, mine, theirs):
    for p, tp in zip(mine, theirs):
        g = rng.standard_normal(p.shape).astype(p.dtype)
        p.grad = g
        if tp is not None:
            tp.grad = torch.from_numpy(g.copy())


class Bound:
    """How far two float implementations of the same update may drift apart.

    Each step rounds ``p`` (a few ulps of ``|p|``) and computes the update ``dp`` through
    about ten rounded operations on state that already carries the earlier steps' rounding,
    so after ``t`` steps the difference is within ``c * eps * t * (max|p| + t * max|dp|)``.
    A wrong rule (a missed bias correction, weight decay in the wrong place, the wrong
    average) moves ``p`` by a fraction of ``|dp|``, far above this for float64 and float32.

    The largest difference from torch 2.13 measured here is about 6 in units of
    ``eps * t * (max|p| + t * max|dp|)`` (AdaGrad with lr 0.5 and weight decay, where an
    early rounding difference feeds back through the decay); ``C`` leaves room for torch
    builds that fuse other operations.
    """

    C = 16

    def __init__(self, dtype):
        self.eps = np.finfo(dtype).eps
        self.p = 0.0
        self.dp = 0.0
        self.t = 0

    def step(self, before, after):
        self.t += 1
        self.p = max(self.p, max(np.abs(a).max() for a in after))
        self.dp = max(self.dp, max(np.abs(a - b).max() for a, b in zip(after, before)))

    @property
    def tol(self):
        return self.C * self.eps * self.t * (self.p + self.t * self.dp)


def torch_values(theirs):
    return [tp.detach().numpy().copy() for tp in theirs]


# --- every option against torch, step by step ----------------------------------------------

@pytest.mark.parametrize("cls,tname,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", [False, True], ids=["list", "groups"])
def test_matches_torch_step_by_step(cls, tname, kw, dtype, split):
    mine, theirs = make_pair(dtype)
    opt = cls(groups_of(mine, kw, split), **kw)
    topt = getattr(torch.optim, tname)(groups_of(theirs, kw, split), **kw)
    rng = np.random.default_rng(1)
    bound = Bound(dtype)
    for _ in range(STEPS):
        before = torch_values(theirs)
        opt.zero_grad()
        topt.zero_grad()
        feed(rng, mine, theirs)
        opt.step()
        topt.step()
        want = torch_values(theirs)
        bound.step(before, want)
        for p, w in zip(mine, want):
            np.testing.assert_allclose(p.data, w, rtol=0, atol=bound.tol)


def test_group_options_apply_per_group():
    a = nn.Parameter(np.ones(3))
    b = nn.Parameter(np.ones(3))
    opt = nn.SGD([{"params": [a]}, {"params": b, "lr": 0.0}], lr=0.5, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["params"] == [b]
    a.grad = np.ones(3)
    b.grad = np.ones(3)
    opt.step()
    np.testing.assert_array_equal(a.data, 0.5)
    np.testing.assert_array_equal(b.data, 1.0)
    # A group's options are read at every step: changing them changes the next step.
    opt.param_groups[1]["lr"] = 0.25
    opt.step()      # b's buffer is 0.9 * 1 + 1 = 1.9
    np.testing.assert_allclose(b.data, 1.0 - 0.25 * 1.9, rtol=1e-15)


def test_sgd_lr_may_come_from_every_group():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = nn.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    a.grad = b.grad = np.ones(2)
    opt.step()
    np.testing.assert_allclose([a.data[0], b.data[0]], [0.9, 0.8], rtol=1e-15)
    with pytest.raises(ValueError, match="missing keys \\['lr'\\]"):
        nn.SGD([{"params": [a], "lr": 0.1}, {"params": [b]}])
    with pytest.raises(ValueError, match="missing keys"):
        nn.SGD([a])


def test_param_groups_have_torchs_keys():
    p = nn.Parameter(np.zeros(2))
    tp = torch.nn.Parameter(torch.zeros(2))
    for cls, tname, kw in CASES:
        mine = cls([p], **kw).param_groups[0]
        theirs = getattr(torch.optim, tname)([tp], **kw).param_groups[0]
        assert list(mine) == list(theirs), tname
        for key, value in theirs.items():
            if key != "params":
                assert mine[key] == value, (tname, key)


# --- state dicts ---------------------------------------------------------------------------

def torch_sd_to_numpy(sd):
    """A torch optimizer state dict with arrays and floats in place of tensors."""
    return {"state": {i: {k: (float(v) if k == "step" else v.numpy().copy())
                          for k, v in entry.items()} for i, entry in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


def numpy_sd_to_torch(sd):
    return {"state": {i: {k: (v if k == "step" else torch.from_numpy(v.copy()))
                          for k, v in entry.items()} for i, entry in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


def train(opt, params, tparams, topt, rng, steps):
    for _ in range(steps):
        opt.zero_grad()
        if topt is not None:
            topt.zero_grad()
        feed(rng, params, tparams if tparams is not None else [None] * len(params))
        opt.step()
        if topt is not None:
            topt.step()


@pytest.mark.parametrize("cls,tname,kw", CASES, ids=IDS)
def test_state_dict_matches_torchs(cls, tname, kw):
    mine, theirs = make_pair(F64, shapes=[(4, 3), (5,)])
    opt = cls(groups_of(mine, kw, True), **kw)
    topt = getattr(torch.optim, tname)(groups_of(theirs, kw, True), **kw)
    if tname != "Adagrad":      # torch's Adagrad sets up its state in the constructor
        assert opt.state_dict()["state"] == {} == topt.state_dict()["state"]
    train(opt, mine, theirs, topt, np.random.default_rng(2), 3)
    got = opt.state_dict()
    want = torch_sd_to_numpy(topt.state_dict())
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, entry in want["state"].items():
        assert list(got["state"][i]) == list(entry), (i, list(got["state"][i]))
        for k, v in entry.items():
            if k == "step":
                assert got["state"][i][k] == v == 3.0
            else:
                assert got["state"][i][k].shape == v.shape and got["state"][i][k].dtype == F64
                # A buffer is a running sum of rounded terms: a few ulps of its size per step.
                tol = Bound.C * np.finfo(F64).eps * 3 * np.abs(v).max()
                np.testing.assert_allclose(got["state"][i][k], v, rtol=0, atol=tol)


def test_state_dict_is_a_copy():
    p = nn.Parameter(np.ones(3))
    opt = nn.Adam([p], lr=0.1)
    p.grad = np.ones(3)
    opt.step()
    sd = opt.state_dict()
    saved = copy.deepcopy(sd)
    opt.param_groups[0]["lr"] = 0.5
    opt.step()
    assert sd["state"][0]["step"] == 1.0 and sd["param_groups"][0]["lr"] == 0.1
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    # ... and loading does not alias the dict loaded.
    opt.load_state_dict(sd)
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


@pytest.mark.parametrize("cls,tname,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_is_bitwise_identical(cls, tname, kw, dtype):
    """Stopping after 3 steps, saving parameters and optimizer, and continuing in a new
    optimizer gives exactly the parameters of an uninterrupted run."""
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    full, _ = make_pair(dtype)
    opt = cls(groups_of(full, kw, True), **kw)
    train(opt, full, None, None, rng_a, STEPS)

    first, _ = make_pair(dtype)
    opt1 = cls(groups_of(first, kw, True), **kw)
    train(opt1, first, None, None, rng_b, STEPS // 2)
    saved_params = [p.data.copy() for p in first]
    saved = opt1.state_dict()
    del opt1

    resumed, _ = make_pair(dtype, seed=99)      # other values: all must come from the save
    for p, v in zip(resumed, saved_params):
        p.data = v
    opt2 = cls(groups_of(resumed, kw, True), **kw)
    opt2.load_state_dict(saved)
    train(opt2, resumed, None, None, rng_b, STEPS - STEPS // 2)
    for p, q in zip(resumed, full):
        np.testing.assert_array_equal(p.data, q.data)


@pytest.mark.parametrize("cls,tname,kw", CASES, ids=IDS)
def test_load_torch_state_dict_and_continue(cls, tname, kw):
    """A torch optimizer trained 3 steps; its state (as arrays) loads here, and both continue
    3 steps with the same gradients to the same parameters."""
    dtype = F64
    mine, theirs = make_pair(dtype)
    topt = getattr(torch.optim, tname)(groups_of(theirs, kw, True), **kw)
    rng = np.random.default_rng(4)
    for _ in range(3):
        topt.zero_grad()
        for tp in theirs:
            tp.grad = torch.from_numpy(rng.standard_normal(tuple(tp.shape)))
        topt.step()
    for p, tp in zip(mine, theirs):
        p.data = tp.detach().numpy()
    opt = cls(groups_of(mine, kw, True), **kw)
    opt.load_state_dict(torch_sd_to_numpy(topt.state_dict()))
    bound = Bound(dtype)
    for _ in range(3):
        before = torch_values(theirs)
        feed(rng, mine, theirs)
        opt.step()
        topt.step()
        want = torch_values(theirs)
        bound.step(before, want)
        for p, w in zip(mine, want):
            np.testing.assert_allclose(p.data, w, rtol=0, atol=bound.tol)


@pytest.mark.parametrize("cls,tname,kw", CASES, ids=IDS)
def test_torch_loads_our_state_dict_and_continues(cls, tname, kw):
    mine, theirs = make_pair(F64)
    opt = cls(groups_of(mine, kw, True), **kw)
    rng = np.random.default_rng(5)
    train(opt, mine, None, None, rng, 3)
    for p, tp in zip(mine, theirs):
        with torch.no_grad():
            tp.copy_(torch.from_numpy(p.data.copy()))
    topt = getattr(torch.optim, tname)(groups_of(theirs, kw, True), **kw)
    topt.load_state_dict(numpy_sd_to_torch(opt.state_dict()))
    bound = Bound(F64)
    for _ in range(3):
        before = torch_values(theirs)
        feed(rng, mine, theirs)
        opt.step()
        topt.step()
        want = torch_values(theirs)
        bound.step(before, want)
        for p, w in zip(mine, want):
            np.testing.assert_allclose(p.data, w, rtol=0, atol=bound.tol)


def test_adamw_state_loads_into_adam_with_decoupled_decay():
    p, q = nn.Parameter(np.ones(4)), nn.Parameter(np.ones(4))
    a = nn.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = np.arange(4.0)
    a.step()
    b = nn.Adam([q])
    q.data = p.data
    b.load_state_dict(a.state_dict())
    assert b.param_groups[0]["decoupled_weight_decay"] is True
    p.grad = q.grad = np.full(4, -1.0)
    a.step()
    b.step()
    np.testing.assert_array_equal(p.data, q.data)
    # AdamW cannot take Adam's coupled rule.
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        nn.AdamW([p]).load_state_dict(nn.Adam([p], weight_decay=0.1).state_dict())


# --- errors ---------------------------------------------------------------------------------

def trained_rmsprop():
    params = [nn.Parameter(np.ones((2, 3))), nn.Parameter(np.ones(4)), nn.Parameter(np.ones(1))]
    opt = nn.RMSprop([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}],
                     momentum=0.9, centered=True)
    for p in params:
        p.grad = np.full(p.shape, 0.5)
    opt.step()
    return params, opt


def bad_state_dicts(sd):
    """(description, mutate, error) for state dicts that do not fit ``trained_rmsprop``."""
    def m(f):
        def g():
            d = copy.deepcopy(sd)
            f(d)
            return d
        return g
    return [
        ("a group fewer", m(lambda d: d["param_groups"].pop()), ValueError, "groups"),
        ("a parameter fewer", m(lambda d: d["param_groups"][0]["params"].pop()), ValueError,
         "parameters"),
        ("a repeated index", m(lambda d: d["param_groups"][1]["params"].__setitem__(0, 0)),
         ValueError, "distinct"),
        ("state for an unknown index", m(lambda d: d["state"].__setitem__(7, d["state"][0])),
         ValueError, "index 7"),
        ("an unknown top-level key", m(lambda d: d.__setitem__("extra", 1)), ValueError,
         "unknown keys \\['extra'\\]"),
        ("no state", m(lambda d: d.pop("state")), ValueError, "missing keys \\['state'\\]"),
        ("an unknown group option", m(lambda d: d["param_groups"][0].__setitem__("lrr", 1)),
         ValueError, "unknown keys \\['lrr'\\]"),
        ("a missing group option", m(lambda d: d["param_groups"][0].pop("alpha")), ValueError,
         "missing keys \\['alpha'\\]"),
        ("a negative lr", m(lambda d: d["param_groups"][1].__setitem__("lr", -1.0)),
         ValueError, "learning rate"),
        ("an unsupported torch option",
         m(lambda d: d["param_groups"][0].__setitem__("maximize", True)), ValueError,
         "maximize"),
        ("a missing buffer", m(lambda d: d["state"][1].pop("grad_avg")), ValueError,
         "missing keys \\['grad_avg'\\]"),
        ("an unknown buffer", m(lambda d: d["state"][1].__setitem__("exp_avg", np.ones(4))),
         ValueError, "unknown keys \\['exp_avg'\\]"),
        ("a buffer of the wrong shape",
         m(lambda d: d["state"][0].__setitem__("square_avg", np.ones(6))), ValueError,
         "shape"),
        ("a fractional step", m(lambda d: d["state"][2].__setitem__("step", 1.5)), ValueError,
         "whole number"),
        ("a string buffer",
         m(lambda d: d["state"][2].__setitem__("square_avg", np.array(["x"]))), TypeError,
         "dtype"),
        ("not a dict", lambda: [("state", {})], TypeError, "dict"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_state_dict_raises_and_changes_nothing(case):
    params, opt = trained_rmsprop()
    before = opt.state_dict()
    what, make, exc, match = bad_state_dicts(before)[case]
    with pytest.raises(exc, match=match):
        opt.load_state_dict(make())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"], what
    assert sorted(after["state"]) == sorted(before["state"]), what
    for i, entry in before["state"].items():
        assert list(after["state"][i]) == list(entry)
        for k, v in entry.items():
            np.testing.assert_array_equal(after["state"][i][k], v)
    # The groups still hold the same Parameter objects.
    assert [p for g in opt.param_groups for p in g["params"]] == params


def test_bad_state_dict_cases_are_all_run():
    _, opt = trained_rmsprop()
    assert len(bad_state_dicts(opt.state_dict())) == 16


def test_state_dict_load_checks_the_receiving_optimizer():
    _, opt = trained_rmsprop()
    sd = opt.state_dict()
    params = [nn.Parameter(np.ones((2, 3))), nn.Parameter(np.ones(4)), nn.Parameter(np.ones(1))]
    # The groups' options come from the state dict, whatever the receiver was built with.
    other = nn.RMSprop([{"params": params[:2]}, {"params": params[2:]}])
    other.load_state_dict(sd)
    assert other.param_groups[0]["centered"] is True and other.param_groups[1]["lr"] == 0.5
    with pytest.raises(ValueError, match="groups"):
        nn.RMSprop(params).load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown keys"):
        nn.Adam([{"params": params[:2]}, {"params": params[2:]}]).load_state_dict(sd)


def test_group_errors():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match="twice"):
        nn.Adam([{"params": [a, b]}, {"params": [b]}])
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        nn.Adam([{"params": [a], "learning_rate": 0.1}])
    with pytest.raises(ValueError, match="learning rate"):
        nn.Adam([{"params": [a], "lr": -0.1}])
    with pytest.raises(ValueError, match="beta"):
        nn.AdamW([{"params": [a], "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="amsgrad"):
        nn.Adam([{"params": [a], "amsgrad": True}])
    with pytest.raises(ValueError, match="params"):
        nn.Adam([{"lr": 0.1}])
    with pytest.raises(TypeError, match="only dicts"):
        nn.Adam([{"params": [a]}, b])
    with pytest.raises(TypeError):
        nn.Adam({"params": [a]})
    with pytest.raises(TypeError):
        nn.Adam([{"params": [a, np.ones(2)]}])
    with pytest.raises(TypeError, match="centered"):
        nn.RMSprop([a], centered="yes")
    with pytest.raises(ValueError, match="momentum"):
        nn.RMSprop([a], momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        nn.AdaGrad([a], weight_decay=float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        nn.AdamW([a], weight_decay=-1e-2)
    # A group that fails leaves the optimizer as it was.
    opt = nn.SGD([a], lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [b], "lr": -1})
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [a]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": b, "momentum": 0.5})
    assert opt.param_groups[1]["params"] == [b] and opt.param_groups[1]["lr"] == 0.1


def test_adamw_defaults():
    p = nn.Parameter(np.ones(1))
    g = nn.AdamW([p]).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    assert g["decoupled_weight_decay"] is True
    # The decay does not enter the moments: with a zero gradient the first step only shrinks.
    opt = nn.AdamW([p], lr=0.1, weight_decay=0.5)
    opt.step()
    np.testing.assert_array_equal(p.data, [1.0 - 0.1 * 0.5])
