"""torch.export of every registered model in every mode matches the eager model.

Each program is traced with a batch of 2 and run at batch sizes 1 and 3 (dynamic batch),
with halting biases near 0 so that halting is non-trivial. The shallowest model of each
family runs by default; the deeper ones (same code, more units: slower to trace) are
marked ``slow``. Saving / loading ``.pt2`` files is covered in ``test_tools_export.py``.
"""

from __future__ import annotations

import pytest
import torch

import sact
from sact.tools.export import ExportableModel, export_program
from sact.halting import ACTHalting, SACTHalting
from sact.stage import MODES

#: one model per unit family (pre-activation basic, bottleneck, pre-activation bottleneck)
REPRESENTATIVE = ("resnet20_cifar", "resnet50", "resnet50_v2")


def model_params(modes=MODES):
    """``(name, mode)`` pairs for every registered model, deeper ones marked slow."""
    # resnet18's stages have 2 units: the tiny model's halting is trivial there; resnet34
    # covers the same (basic) units
    return [
        pytest.param(name, mode, marks=() if name in REPRESENTATIVE else pytest.mark.slow)
        for name in sact.list_models()
        if name != "resnet18"
        for mode in modes
    ]


def tiny_model(name: str, mode: str) -> tuple[torch.nn.Module, int]:
    """A reduced-width model with halting biases near 0, and its test image side."""
    if name.endswith("_cifar"):
        model, size = sact.create_model(name, mode=mode, base_channels=4), 16
    else:
        kwargs = dict(mode=mode, base_width=8, num_classes=10)
        try:
            model = sact.create_model(name, stem_width=8, **kwargs)
        except ValueError:  # families without a separate stem width
            model = sact.create_model(name, **kwargs)
        size = 64
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        # the init bias -3 makes (almost) every position run every unit; near 0 the
        # cumulative halting probability crosses 1 - eps after a few units, unevenly.
        if isinstance(m, SACTHalting):
            bias = m.local_conv.bias
        elif isinstance(m, ACTHalting):
            bias = m.global_conv.bias
        else:
            continue
        with torch.no_grad():
            bias.copy_(torch.rand(bias.shape, generator=gen) - 0.5)
    return model.eval(), size


def check_matches(model: torch.nn.Module, run, size: int) -> None:
    """``run(x) -> (logits, ponder_cost, ponder_map)`` equals the eager model at batches 1 and 3."""
    wrapper = ExportableModel(model).eval()
    for batch in (1, 3):
        x = torch.randn(batch, model.in_chans, size, size)
        with torch.no_grad():
            out = model(x)
            ref = wrapper(x)
        got = tuple(torch.as_tensor(t) for t in run(x))
        assert [tuple(t.shape) for t in got] == [(batch, 10), (batch,), (batch, size, size)]
        for name, r, g in zip(("logits", "ponder_cost", "ponder_map"), ref, got):
            # float32 through 100+ layers: ONNX Runtime's kernels round differently, and
            # random deep models have logits in the tens, so the tolerance scales with them.
            scale = max(1.0, float(r.abs().max()))
            torch.testing.assert_close(g, r, atol=1e-4 * scale, rtol=1e-3, msg=lambda m: f"{name}, batch {batch}: {m}")
        torch.testing.assert_close(ref[1], out.ponder_cost)
        if model.mode == "vanilla":
            total_units = sum(len(s) for s in model.stages)
            assert torch.equal(ref[2], torch.full_like(ref[2], float(total_units)))
            continue
        # halting is non-trivial: some position stops before its stage's last unit ...
        assert any((s.num_units < len(stage)).any() for s, stage in zip(out.stages, model.stages))
        # ... and not everywhere at the same unit
        assert ref[2].unique().numel() > 1 if model.mode == "sact" else batch == 1 or ref[1].unique().numel() > 1


@pytest.mark.parametrize("name, mode", model_params())
def test_torch_export_matches_eager(name, mode):
    torch.manual_seed(0)
    model, size = tiny_model(name, mode)
    module = export_program(model, image_size=size).module()

    def run(x):
        with torch.no_grad():
            return module(x)

    check_matches(model, run, size)
