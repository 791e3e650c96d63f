"""One training step of the reference graph (``shared/fixtures/tf_train_step``), in float64.

The fixture holds, for vanilla, ACT and SACT ResNet-32 on 4 CIFAR images, the reference's
training-mode logits, the input gradient of the cross-entropy and every parameter gradient
of ``CE + tau * sum_stages mean(ponder_cost)`` (its README says how it was made). Here the
checkpoint is converted with :func:`sact.tools.convert_tf.convert_tf_checkpoint`, run in float64
training mode (batch statistics), and the torch-op path and the fused halting path
(:mod:`sact.halting_fused`), on its native kernels and on its torch ops, must reproduce it.

Needs TensorFlow to read the checkpoints (skipped otherwise) and the fixture folder: found
at ``$SACT_FIXTURES/tf_train_step`` or ``../shared/fixtures/tf_train_step`` next to the checkout.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_ROOTS = [Path(os.environ["SACT_FIXTURES"])] if os.environ.get("SACT_FIXTURES") else []
_ROOTS.append(Path(__file__).resolve().parents[2] / "shared" / "fixtures")
FIXTURE = next((r / "tf_train_step" for r in _ROOTS if (r / "tf_train_step" / "README.md").is_file()), None)
if FIXTURE is None:
    pytest.skip("no tf_train_step fixture (set SACT_FIXTURES or place ../shared/fixtures)", allow_module_level=True)
if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("reading the fixture's TF checkpoints needs tensorflow-cpu", allow_module_level=True)

from sact.tools.convert_tf import convert_tf_checkpoint, import_tensorflow  # noqa: E402

import_tensorflow()  # triton before TensorFlow (see import_tensorflow)

import sact.native  # noqa: E402
from sact import halting_fused  # noqa: E402


torch.set_num_threads(1)


def _converted(mode: str, folder: str) -> torch.nn.Module:
    return convert_tf_checkpoint(FIXTURE / folder / "model.ckpt", model="resnet32_cifar", mode=mode)


@pytest.fixture(scope="module", params=["vanilla", "act", "sact"])
def reference(request):
    """``(mode, float64 model in training mode, its gradient model, npz arrays)``."""
    mode = request.param
    model = _converted(mode, mode).double().train()
    grads = _converted(mode, f"{mode}_grad").double()
    return mode, model, grads, np.load(FIXTURE / f"{mode}_step.npz")


@pytest.mark.parametrize("path", ["torch", "fused", pytest.param("native", marks=pytest.mark.skipif(
    not sact.native.available(), reason="no native build"))])
def test_one_training_step_matches_reference(reference, path, monkeypatch):
    mode, model, grads, ref = reference
    fused = path != "torch"
    calls = []  # the native kernels' calls
    real = halting_fused._native_ops
    monkeypatch.setattr(halting_fused, "_native_ops", lambda: calls.append(1) or real())
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(ref["input_nchw"]).double().requires_grad_(True)
    labels = torch.from_numpy(ref["labels"]).long()
    prev = sact.native.set_enabled(path == "native")
    try:
        with halting_fused.use(fused):
            out = model(x)
            if mode != "vanilla":  # the path under test is the one that ran
                assert all(halting_fused.applies(stage, x) == fused for stage in model.stages)
        ce = F.cross_entropy(out.logits, labels)
        loss = ce if mode == "vanilla" else ce + float(ref["tau"]) * sum(s.ponder_cost.mean() for s in out.stages)
        (dx,) = torch.autograd.grad(ce, x, retain_graph=True)
        loss.backward()
    finally:
        sact.native.set_enabled(prev)
    assert bool(calls) == (path == "native" and mode != "vanilla")
    model.load_state_dict(state)  # the step updated the BN running statistics: undo for the next parametrisation

    logits = torch.from_numpy(ref["logits"])
    assert out.logits.dtype == torch.float64
    torch.testing.assert_close(out.logits.detach(), logits, rtol=1e-12, atol=1e-12 * logits.abs().max().item())
    dx_ref = torch.from_numpy(ref["dx_data_loss"])
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12 * dx_ref.abs().max().item())

    expected = dict(grads.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        g_ref = expected[name].detach()
        scale = g_ref.abs().max().item()
        assert p.grad is not None, name
        # stored as float32 (~6e-8 of the largest value); 1e-12: gradients that are 0 up to rounding (a bias before a BN)
        torch.testing.assert_close(p.grad, g_ref, rtol=0, atol=1e-6 * scale + 1e-12, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(expected) and checked > 90
