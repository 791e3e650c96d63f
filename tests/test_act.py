"""The halting recurrence against the reference's golden values (act_test.py) and properties."""

from __future__ import annotations

import pytest
import torch

from sact.act import adaptive_computation_time, halting_step

UNIT_OUTPUTS = torch.arange(5.0)  # reference test: unit n outputs the scalar n


@pytest.mark.parametrize(
    "probs, ponder, num_units, dist, output, flops, grad",
    [
        ([0.999, 0.5, 0.5, 0.5], 2.0, 1, [1, 0, 0, 0, 0], 0.0, 2, [0, 0, 0, 0]),
        ([0.01, 0.5, 0.6, 0.7], 3.49, 3, [0.01, 0.5, 0.49, 0, 0], 1.48, 6, [-1, -1, 0, 0]),
        ([0.01, 0.01, 0.01, 0.01], 5.96, 5, [0.01, 0.01, 0.01, 0.01, 0.96], 3.9, 10, [-1, -1, -1, -1]),
    ],
    ids=["first", "middle", "last"],
)
def test_act_golden_values(probs, ponder, num_units, dist, output, flops, grad):
    h = torch.tensor([probs], dtype=torch.float64, requires_grad=True)
    p, n, d = adaptive_computation_time(h)
    assert p.item() == pytest.approx(ponder, abs=1e-12)
    assert n.item() == num_units
    torch.testing.assert_close(d[0], torch.tensor(dist, dtype=torch.float64))
    assert (d[0] * UNIT_OUTPUTS.double()).sum().item() == pytest.approx(output, abs=1e-12)
    # FLOPs golden: every unit costs 2 per object and runs iff num_units > n.
    assert int(2 * (torch.arange(5) < n).sum()) == flops
    p.sum().backward()
    torch.testing.assert_close(h.grad[0], torch.tensor(grad, dtype=torch.float64))


def test_sact_simple_golden():
    """SactTest.testSimple: a 1x1x2 map, 3 units, outputs [1,2], [3,4], [5,6]."""
    outputs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]
    probs = [torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.1]), None]
    state, out, masks = None, 0.0, []
    for n in range(3):
        if n > 0:
            masks.append(state.active.float())
        state, w = halting_step(state, probs[n])
        out = out + w * outputs[n]
    torch.testing.assert_close(state.ponder_cost, torch.tensor([2.1, 3.8]))
    assert state.num_units.tolist() == [2, 3]
    torch.testing.assert_close(out, torch.tensor([1.2, 5.4]))
    assert masks[0].tolist() == [1, 1] and masks[1].tolist() == [0, 1]
    _, _, dist = adaptive_computation_time(torch.tensor([[0.9, 0.5], [0.1, 0.1]]))
    torch.testing.assert_close(dist, torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8]]))


def test_sact_residual_mask_golden():
    """SactTest.testResidualMask: unit = x + ones * mask from input 0."""
    probs = [torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.1]), None]
    x = torch.zeros(2)
    state, out, states = None, 0.0, []
    for n in range(3):
        mask = torch.ones(2) if n == 0 else state.active.float()
        x = x + mask
        states.append(x.clone())
        state, w = halting_step(state, probs[n])
        out = out + w * x
    assert [s.tolist() for s in states] == [[1, 1], [2, 2], [2, 3]]
    torch.testing.assert_close(out, torch.tensor([1.1, 2.7]))


def test_identity_units_give_identity_output():
    """If every unit returns its input, the block output is the input (probs sum to 1)."""
    x = torch.randn(3, 4, 5)
    h = torch.softmax(torch.randn(3, 4, 5, 5), -1)[..., :4]  # random, first 4 of 5
    _, _, d = adaptive_computation_time(h)
    torch.testing.assert_close((d * x[..., None]).sum(-1), x)


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 5, 6), (1, 1, 1, 1)])
@pytest.mark.parametrize("units", [1, 2, 5, 9])
def test_properties_random(shape, units):
    g = torch.Generator().manual_seed(hash((shape, units)) % 2**31)
    h = torch.rand(*shape, units - 1, generator=g, dtype=torch.float64) ** 3
    p, n, d = adaptive_computation_time(h)
    assert p.shape == shape and n.shape == shape and d.shape == (*shape, units)
    torch.testing.assert_close(d.sum(-1), torch.ones(shape, dtype=torch.float64))
    assert (d >= 0).all()
    assert ((n.double() < p) & (p <= n.double() + 1)).all()
    assert ((n >= 1) & (n <= units)).all()
    # N is the first unit whose cumulative probability reaches 0.99 (or the last unit).
    c = torch.cat([h.cumsum(-1), torch.ones(*shape, 1, dtype=torch.float64) * 2], -1)
    first = (c >= 0.99).double().argmax(-1)
    assert torch.equal(n, first + 1)
    # the distribution is zero after the halting unit
    after = torch.arange(units) >= n[..., None]
    assert (d[after] == 0).all()


def test_eps_changes_threshold():
    h = torch.tensor([[0.95, 0.0]])
    assert adaptive_computation_time(h, eps=0.01)[1].item() == 3
    assert adaptive_computation_time(h, eps=0.1)[1].item() == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating"):
        adaptive_computation_time(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        state, _ = halting_step(None, torch.rand(3))
        halting_step(state, torch.rand(4))
