"""The fused halting unit (sact.halting_fused) against the torch-op path it replaces.

The reference is the composition the dense run uses without it: ``branch(x)``, then
``act.halting_step``, then ``out + p^n * x``. Compared on the CIFAR (leaky-ReLU) and ImageNet
(identity) branch layouts, ACT and SACT, NCHW and channels-last, with states where some
positions halted before, some halt in this unit and some keep running; plus gradcheck in
float64 for every input, and whole-model SGD steps. Both implementations of the fused unit
are tested: the native kernels (csrc/halting_train.cpp, where they build) and its torch ops
(``sact.native.set_enabled(False)``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import sact
import sact.native
from sact import halting_fused
from sact.act import HaltingState, halting_step
from sact.halting import ACTHalting, SACTHalting

torch.set_num_threads(1)
EPS = 0.01
NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(not sact.native.available(), reason="no native build"))]

LAYOUTS = {  # the models' branch settings: CIFAR (leaky ReLU 0.1, BN eps 1e-3), ImageNet (identity)
    "cifar": dict(norm_layer=partial(nn.BatchNorm2d, eps=1e-3), activation=nn.LeakyReLU(0.1)),
    "imagenet": dict(norm_layer=partial(nn.BatchNorm2d, eps=1e-5, momentum=0.003)),
}


def make_branch(mode: str, layout: str, c: int, *, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    branch = (SACTHalting if mode == "sact" else ACTHalting)(c, **LAYOUTS[layout]).to(dtype)
    with torch.no_grad():  # random BN parameters and statistics, and a bias that halts some positions
        for bn in (m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 1.5)
        conv = branch.local_conv if mode == "sact" else branch.global_conv
        conv.bias.fill_(-1.0)
    return branch.train()


def make_state(shape, dtype, *, seed: int = 1) -> HaltingState:
    """A state where a third of the positions halted before, a third are about to halt (cumsum
    0.985: any h > 0.005 halts them now) and a third have cumsum 0."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 3, shape, generator=g)
    cumsum = torch.where(kind == 0, torch.tensor(1.2), torch.where(kind == 1, torch.tensor(0.985), torch.tensor(0.0)))
    cumsum = cumsum.to(dtype)
    finished = kind == 0
    remainder = torch.where(finished, torch.full(shape, 0.1, dtype=dtype), 1 - cumsum)
    ponder = torch.rand(shape, generator=g, dtype=dtype) + 2
    return HaltingState(cumsum, finished, remainder, ponder, torch.randint(1, 4, shape, generator=g))


def reference_unit(branch, x, out, state, eps=EPS):
    """The torch-op path of DenseRun: branch, halting_step, accumulation."""
    proba = None if branch is None else branch(x)
    state, w = halting_step(state, proba, eps=eps)
    wx = w.to(x.dtype)
    wx = wx.unsqueeze(1) if wx.dim() == 3 else wx.view(-1, 1, 1, 1)
    return (wx * x if out is None else torch.addcmul(out, x, wx)), state, w


@contextlib.contextmanager
def native_kernels(flag: bool):
    prev = sact.native.set_enabled(flag)
    try:
        yield
    finally:
        sact.native.set_enabled(prev)


def run_both(mode, layout, *, b=4, c=6, hw=(5, 7), last=False, first=False, channels_last=False,
             dtype=torch.float32, native=False):
    """Values, input gradients, parameter gradients and BN buffers of both paths (the fused one on
    the native kernels or its torch ops)."""
    results = []
    for path in ("reference", "fused"):
        branch = None if last else make_branch(mode, layout, c, dtype=dtype)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(b, c, *hw, generator=g, dtype=dtype)
        out = None if first else torch.randn(b, c, *hw, generator=g, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            out = out if out is None else out.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        if out is not None:
            out.requires_grad_(True)
        state = make_state((b, *hw) if mode == "sact" else (b,), dtype if dtype == torch.float64 else torch.float32)
        for t in (state.cumsum, state.remainder, state.ponder_cost):
            t.requires_grad_(True)
        fn = reference_unit if path == "reference" else partial(halting_fused.halting_unit, eps=EPS)
        with native_kernels(native):
            new_out, new_state, w = fn(branch, x, out, state)
            # a loss that reaches every output
            gl = torch.Generator().manual_seed(3)
            loss = sum((t * torch.randn(t.shape, generator=gl, dtype=t.dtype)).sum()
                       for t in (new_out, new_state.cumsum, new_state.remainder, new_state.ponder_cost, w))
            loss.backward()
        inputs = [x, out, state.cumsum, state.remainder, state.ponder_cost]
        results.append(dict(
            values=[new_out, new_state.cumsum, new_state.remainder, new_state.ponder_cost, w],
            exact=[new_state.finished, new_state.num_units],
            grads=[None if t is None else t.grad for t in inputs]
                  + ([] if branch is None else [p.grad for p in branch.parameters()]),
            buffers=[] if branch is None else [t.clone() for t in branch.buffers()],
            state_in=state, new_state=new_state, out=new_out))
    return results


def assert_close_rel(a, b, rtol, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    scale = b.abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("native", NATIVE, ids=["torch_ops", "native"])
@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode", ["act", "sact"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_equal_to_torch_path(mode, layout, channels_last, native):
    ref, fused = run_both(mode, layout, channels_last=channels_last, native=native)
    # the state mixes positions halted before, halting in this unit and running
    before, now = ref["state_in"].finished, ref["new_state"].finished & ~ref["state_in"].finished
    assert before.any() and now.any() and (~ref["new_state"].finished).any()
    for a, b in zip(fused["exact"], ref["exact"]):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(fused["values"], ref["values"])):
        assert_close_rel(a, b, 1e-5, f"value {i}")
    for i, (a, b) in enumerate(zip(fused["grads"], ref["grads"])):
        assert_close_rel(a, b, 1e-5, f"gradient {i}")
    assert len(fused["buffers"]) == (3 if mode == "act" else 6)  # running mean/var, num_batches_tracked per BN
    initial = list(make_branch(mode, layout, 6).buffers())
    for i, (a, b) in enumerate(zip(fused["buffers"], ref["buffers"])):
        assert not torch.equal(b, initial[i]), f"buffer {i}"  # the step updates every running statistic
        if native and a.is_floating_point():  # the native kernels' own batch statistics: equal up to rounding
            assert_close_rel(a, b, 1e-6, f"buffer {i}")
        else:
            assert torch.equal(a, b), f"buffer {i}"  # the same BN kernel: the same running statistics
    if channels_last:
        assert fused["out"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("native", NATIVE, ids=["torch_ops", "native"])
@pytest.mark.parametrize("mode", ["act", "sact"])
@pytest.mark.parametrize("case", ["last", "first"])
def test_first_unit_and_forced_halt_of_the_last(mode, case, native):
    ref, fused = run_both(mode, "cifar", last=case == "last", first=case == "first", native=native)
    if case == "last":  # every position halts
        assert fused["new_state"].finished.all()
    for a, b in zip(fused["exact"], ref["exact"]):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(fused["values"] + fused["grads"], ref["values"] + ref["grads"])):
        assert_close_rel(a, b, 1e-5, f"tensor {i}")


@pytest.mark.skipif(not sact.native.available(), reason="no native build")
@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode", ["act", "sact"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["3x3", "1x1", "2x5_b2", "last_b1"])
def test_native_float64_borders_and_batches(mode, layout, channels_last, case):
    """float64 to ~1e-12: feature maps whose every position touches the zero padding (3x3, 1x1,
    non-square 2x5), two images, and one image (the last unit: a branch needs 2 for its BN)."""
    hw = {"3x3": (3, 3), "1x1": (1, 1), "2x5_b2": (2, 5), "last_b1": (3, 4)}[case]
    b = {"2x5_b2": 2, "last_b1": 1}.get(case, 4)
    ref, fused = run_both(mode, layout, b=b, hw=hw, last=case == "last_b1", channels_last=channels_last,
                          dtype=torch.float64, native=True)
    for a, r in zip(fused["exact"], ref["exact"]):
        assert torch.equal(a, r)
    for i, (a, r) in enumerate(zip(fused["values"] + fused["grads"] + fused["buffers"],
                                   ref["values"] + ref["grads"] + ref["buffers"])):
        assert_close_rel(a, r, 1e-12, f"tensor {i}")


def test_native_path_taken_when_available(monkeypatch):
    calls = []
    real = halting_fused._native_ops
    monkeypatch.setattr(halting_fused, "_native_ops", lambda: calls.append(1) or real())
    for mode, last in (("sact", False), ("act", False), ("sact", True)):
        run_both(mode, "cifar", last=last, native=False)
        assert not calls  # sact.native.set_enabled(False): the fused unit's torch ops
        if sact.native.available():
            run_both(mode, "cifar", last=last, native=True)
            assert len(calls) == 2  # forward and backward
            calls.clear()
    with native_kernels(True):  # what the native kernels do not cover takes the torch ops
        branch = make_branch("sact", "cifar", 6)
        x = torch.randn(4, 6, 5, 5)
        state = make_state((4, 5, 5), torch.float32)
        halting_fused.halting_unit(branch.eval(), x, None, state, eps=EPS)  # BN in eval mode
        halting_fused.halting_unit(branch.train(), x.double(), None, state, eps=EPS)  # dtypes differ
        halting_fused.halting_unit(branch, x.bfloat16(), None, state, eps=EPS)
    assert not calls


@pytest.mark.skipif(not sact.native.available(), reason="no native build")
def test_native_reproducible_on_two_threads():
    """The kernels' reductions are summed per image and then in image order (not in whatever order
    threads finish): two runs on two threads are bitwise equal."""
    runs = []
    torch.set_num_threads(2)
    try:
        for _ in range(2):
            runs.append(run_both("sact", "cifar", b=5, channels_last=True, native=True)[1])
    finally:
        torch.set_num_threads(1)
    for a, b in zip(runs[0]["values"] + runs[0]["grads"] + runs[0]["buffers"],
                    runs[1]["values"] + runs[1]["grads"] + runs[1]["buffers"]):
        assert a is None and b is None or torch.equal(a, b)


def test_eval_mode_uses_running_statistics():
    results = []
    for path in ("reference", "fused"):
        branch = make_branch("sact", "cifar", 6).eval()
        x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
        before = [t.clone() for t in branch.buffers()]
        fn = reference_unit if path == "reference" else partial(halting_fused.halting_unit, eps=EPS)
        out, state, w = fn(branch, x, None, HaltingState.zeros((3, 5, 5)))
        (out.square().sum() + state.ponder_cost.sum()).backward()
        assert all(torch.equal(a, b) for a, b in zip(branch.buffers(), before))
        results.append([out, w, x.grad, *[p.grad for p in branch.parameters()]])
    for i, (a, b) in enumerate(zip(*results[::-1])):
        assert_close_rel(a, b, 1e-5, f"tensor {i}")


class _Unit(nn.Module):
    """``halting_unit`` as a module of its branch, for gradcheck over the branch's parameters."""

    def __init__(self, branch, finished, num_units) -> None:
        super().__init__()
        self.branch, self.finished, self.num_units = branch, finished, num_units

    def forward(self, x, out, cumsum, remainder, ponder):
        state = HaltingState(cumsum, self.finished, remainder, ponder, self.num_units)
        new_out, s, w = halting_fused.halting_unit(self.branch, x, out, state, eps=EPS)
        return new_out, s.cumsum, s.remainder, s.ponder_cost, w


@pytest.mark.parametrize("native", NATIVE, ids=["torch_ops", "native"])
@pytest.mark.parametrize("mode,layout,last", [("sact", "cifar", False), ("sact", "imagenet", False),
                                              ("act", "cifar", False), ("act", "imagenet", False),
                                              ("sact", "cifar", True)])
def test_gradcheck_every_input(mode, layout, last, native):
    b, c, hw = 3, 3, (4, 5)
    branch = None if last else make_branch(mode, layout, c, dtype=torch.float64)
    shape = (b, *hw) if mode == "sact" else (b,)
    state = make_state(shape, torch.float64)
    unit = _Unit(branch, state.finished, state.num_units)
    g = torch.Generator().manual_seed(5)
    inputs = {"x": torch.randn(b, c, *hw, generator=g, dtype=torch.float64),
              "out": torch.randn(b, c, *hw, generator=g, dtype=torch.float64),
              "cumsum": state.cumsum, "remainder": state.remainder, "ponder": state.ponder_cost}
    params = {} if branch is None else {k: v.detach() for k, v in branch.named_parameters()}
    names = list(inputs) + list(params)

    def fn(*tensors):
        args = dict(zip(names, tensors))
        p = {f"branch.{k}": args[k] for k in params}
        return torch.func.functional_call(unit, p, tuple(args[k] for k in inputs))

    tensors = [t.detach().clone().requires_grad_(True) for t in [*inputs.values(), *params.values()]]
    with native_kernels(native):
        assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def sgd_step(mode: str, fused: bool, *, amp: bool = False, channels_last: bool = False, native: bool = True):
    torch.manual_seed(0)
    model = sact.create_model("resnet20_cifar", mode=mode, base_channels=4).train()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with halting_fused.use(fused), native_kernels(native):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            assert all(halting_fused.applies(s, x[:, :1]) == fused for s in model.stages)
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), y) + 0.05 * out.ponder_cost.mean()
        opt.zero_grad()
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return loss, out, grads, model.state_dict()


@pytest.mark.parametrize("native", NATIVE, ids=["torch_ops", "native"])
@pytest.mark.parametrize("mode", ["act", "sact"])
def test_whole_model_sgd_step_equal(mode, native, monkeypatch):
    calls = []
    real = halting_fused.halting_unit
    monkeypatch.setattr(halting_fused, "halting_unit", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss0, out0, g0, sd0 = sgd_step(mode, False)
    assert not calls
    loss1, out1, g1, sd1 = sgd_step(mode, True, native=native)
    assert len(calls) == 9  # every unit of the 3 stages of 3 units
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for s0, s1 in zip(out0.stages, out1.stages):
        assert torch.equal(s1.num_units, s0.num_units) and torch.equal(s1.flops, s0.flops)
        torch.testing.assert_close(s1.halting_distribution, s0.halting_distribution, rtol=1e-5, atol=1e-6)
    top = max(g.abs().max().item() for g in g0.values())  # a bias before a BN has gradient 0 up to rounding
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5 * top, msg=lambda m: f"{k}: {m}")
    for k in sd0:  # weights after the step, BN running statistics, num_batches_tracked
        torch.testing.assert_close(sd1[k], sd0[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_channels_last_and_autocast_bfloat16():
    loss0, out0, g0, _ = sgd_step("sact", False, amp=True, channels_last=True)
    loss1, out1, g1, _ = sgd_step("sact", True, amp=True, channels_last=True)
    assert out1.ponder_cost.dtype == torch.float32  # the recurrence runs in float32
    for s0, s1 in zip(out0.stages, out1.stages):
        assert torch.equal(s1.num_units, s0.num_units)
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-2)  # bfloat16 features: rounding differs
    torch.testing.assert_close(out1.logits.float(), out0.logits.float(), rtol=2e-2, atol=2e-2)


def test_only_built_in_branches_on_the_cpu_in_training():
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).train()
    x = torch.zeros(2, 4, 8, 8)
    with halting_fused.use(True):
        assert halting_fused.applies(model.layer1, x)
        assert not halting_fused.applies(model.layer1, x[:1])  # one image: the torch path's error
        assert not halting_fused.applies(model.layer1.eval(), x)
    with halting_fused.use(False):
        assert not halting_fused.applies(model.layer1.train(), x)


def test_by_default_only_the_native_kernels():
    """auto: where it measured faster, the native kernels on float32 / float64 features (NCHW or channels-last)."""
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).train()
    x = torch.zeros(2, 4, 8, 8)
    cl = x.contiguous(memory_format=torch.channels_last)
    with halting_fused.use(None):
        assert halting_fused.enabled()
        assert not halting_fused.applies(model.layer1, cl.to(torch.bfloat16))  # autocast features: the torch path
        with native_kernels(False):
            assert not halting_fused.applies(model.layer1, cl)
            assert not halting_fused.applies(model.layer1, x)
        if sact.native.available():
            assert halting_fused.applies(model.layer1, cl)
            assert halting_fused.applies(model.layer1, x)
            assert not halting_fused.applies(model.layer1, x.double())  # float32 branch, float64 features
            model64 = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).double().train()
            assert halting_fused.applies(model64.layer1, x.double())
    with halting_fused.use(True):
        with native_kernels(False):
            assert halting_fused.applies(model.layer1, x)  # forced: the torch-op fused unit without native kernels
    # 5x5 taps: the fused unit reproduces them (its torch ops), the native kernels do not, so auto leaves them
    wide = sact.stage.AdaptiveStage(list(model.layer1.units), mode="sact",
                                    halting_factory=lambda m, c: SACTHalting(c, kernel_size=5)).train()
    with halting_fused.use(True):
        assert halting_fused.applies(wide, x)
    with halting_fused.use(None):
        assert not halting_fused.applies(wide, x)

    class MyBranch(SACTHalting):
        pass

    custom = sact.stage.AdaptiveStage(list(model.layer1.units), mode="sact",
                                      halting_factory=lambda m, c: MyBranch(c)).train()
    with halting_fused.use(True):
        assert not halting_fused.applies(custom, x)


def test_environment_switch():
    code = "import sact.halting_fused as h; print(h._state['setting'])"
    env = {k: v for k, v in os.environ.items() if k != "SACT_FUSED_HALTING"}
    # unset: auto (the default); an unknown value warns and means auto
    for value, expected in ((None, "None"), ("auto", "None"), ("1", "True"), ("0", "False"), ("on", "None")):
        run_env = env if value is None else {**env, "SACT_FUSED_HALTING": value}
        out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=run_env, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == expected, value
        assert ("not one of auto, 1, 0" in out.stderr) == (value == "on"), out.stderr
