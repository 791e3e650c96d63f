"""ONNX export run with onnxruntime matches the eager model.

By default: every mode of ``resnet20_cifar`` plus SACT ``resnet50`` and ACT
``resnet50_v2`` (every unit family, every mode). The dynamo-based ONNX exporter takes
tens of seconds per deep model, so the full matrix (every registered model in every
mode) runs only with ``SACT_EXPORT_FULL=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

import sact
from sact.tools.export import export_model, load_exported
from sact.stage import MODES
from test_tools_export_torch import check_matches, tiny_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

DEFAULT = {("resnet20_cifar", m) for m in MODES} | {("resnet50", "sact"), ("resnet50_v2", "act")}
FULL = os.environ.get("SACT_EXPORT_FULL") == "1"


def onnx_params():
    skip = pytest.mark.skipif(not FULL, reason="full ONNX matrix: set SACT_EXPORT_FULL=1")
    return [
        pytest.param(name, mode, marks=() if (name, mode) in DEFAULT else (skip, pytest.mark.slow))
        for name in sact.list_models()
        for mode in MODES
    ]


@pytest.mark.parametrize("name, mode", onnx_params())
def test_onnx_matches_eager(name, mode, tmp_path):
    torch.manual_seed(0)
    model, size = tiny_model(name, mode)
    path = export_model(model, tmp_path / "m.onnx", format="onnx", image_size=size)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "ponder_cost", "ponder_map"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, size, size]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["sact.mode"] == mode and name in props["sact.model"]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_matches(model, lambda x: [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})], size)
    run, doc = load_exported(path)  # the loader used by `sact export --verify`
    assert doc["mode"] == mode and doc["opset"] == 18 and doc["input_size"] == [3, size, size]
    check_matches(model, run, size)
