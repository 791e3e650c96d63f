"""Standard checkpoints (issue 21, item 3): a torchvision ``.pth`` or a plain ``.safetensors``
is named for what it is, and ``create_model(name, pretrained=...)`` reads it (weights only,
no pickles) as well as an sact checkpoint whose stored arguments rebuild the architecture."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

import sact
from sact import CheckpointError
from sact.cli import main
from helpers import Payload, error_line


def _tiny(mode="sact", **kwargs):
    torch.manual_seed(0)
    model = sact.create_model("resnet20_cifar", mode=mode, base_channels=4, **kwargs)
    with torch.no_grad():  # weights and BN statistics unlike a fresh model's
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1)
    return model.eval()


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def _torchvision_r18():
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return tv.eval()


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_a_state_dict_file_is_named_with_how_to_use_it(tmp_path, capsys, kind):
    state = _tiny().state_dict()
    path = tmp_path / f"weights.{kind}"
    torch.save(state, path) if kind == "pth" else save_file(state, path)
    what = "a PyTorch state dict file (torch.save)" if kind == "pth" else "a plain safetensors state dict"
    for name in (path, path.with_suffix("")) if kind == "safetensors" else (path,):
        with pytest.raises(CheckpointError) as e:
            sact.load_checkpoint(name)
        assert f"{path} is {what}, not an sact checkpoint" in str(e.value)
        assert f"sact train --init {path}" in str(e.value) and f"pretrained='{path}'" in str(e.value)
    assert main(["eval", str(path), "--out", str(tmp_path / "m.json")]) == 2
    line = error_line(capsys.readouterr().err, "eval")
    assert what in line and "--init" in line and not (tmp_path / "m.json").exists()


def test_other_files_are_named_too(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'notes.txt'} is not an sact checkpoint")):
        sact.load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {tmp_path / 'gone.pth'}")):
        sact.load_checkpoint(tmp_path / "gone.pth")
    save_file({"x": torch.zeros(1)}, tmp_path / "train_state.safetensors", metadata={"format": "sact-train-state"})
    with pytest.raises(CheckpointError, match="is an sact training state .* the run's model is"):
        sact.load_checkpoint(tmp_path / "train_state.safetensors")


def test_pretrained_torchvision_state_dict_gives_torchvision_outputs(tmp_path):
    tv = _torchvision_r18()
    wrapped = {"model": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3}  # DDP, references
    torch.save(wrapped, tmp_path / "r18.pth")
    model = sact.create_model("resnet18", mode="vanilla", num_classes=10, pretrained=tmp_path / "r18.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tv(x), rtol=1e-5, atol=1e-5)
    assert model.pretrained_cfg["file"] == str(tmp_path / "r18.pth")
    # an SACT model: every torchvision tensor loads, the halting branches stay fresh
    torch.manual_seed(2)
    fresh = sact.create_model("resnet18", num_classes=10).state_dict()
    torch.manual_seed(2)
    got = sact.create_model("resnet18", num_classes=10, pretrained=tmp_path / "r18.pth").state_dict()
    assert _same(got, tv.state_dict(), tv.state_dict())
    halting = [k for k in got if ".halting." in k]
    assert halting and _same(got, fresh, halting)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_plain_sact_state_dict(tmp_path, suffix):
    saved = _tiny(num_classes=5)
    path = tmp_path / f"plain{suffix}"
    save_file(saved.state_dict(), path) if suffix == ".safetensors" else torch.save(saved.state_dict(), path)
    model = sact.create_model("resnet20_cifar", base_channels=4, num_classes=5, pretrained=path)
    assert _same(model.state_dict(), saved.state_dict(), saved.state_dict())
    # another mode and class count: halting branches and the classifier stay fresh, the rest loads
    act = sact.create_model("resnet20_cifar", mode="act", base_channels=4, num_classes=3, pretrained=path)
    kept = [k for k in act.state_dict() if ".halting." not in k and not k.startswith("fc.")]
    assert _same(act.state_dict(), saved.state_dict(), kept)
    with pytest.raises(CheckpointError, match=r"does not fit the model .*wrong shapes \['"):
        sact.create_model("resnet20_cifar", base_channels=8, num_classes=5, pretrained=path)
    with pytest.raises(CheckpointError, match=r"does not fit the model .*missing \['layer1"):
        sact.create_model("resnet32_cifar", base_channels=4, num_classes=5, pretrained=path)


def test_a_pickle_payload_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "evil.pth")  # torch.save's zip format
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}, protocol=2))  # a bare pickle
    for name in ("evil.pth", "evil.pt"):
        with pytest.raises(CheckpointError, match=f"cannot read .*{name} as a state dict"):
            sact.create_model("resnet18", pretrained=tmp_path / name)
        with pytest.raises(CheckpointError, match="PyTorch state dict file"):
            sact.load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_pretrained_sact_checkpoint_rebuilds_its_stored_arguments(tmp_path):
    torch.manual_seed(0)
    saved = sact.create_model("resnet20_cifar", base_channels=8, num_classes=7).eval()
    sact.save_checkpoint(saved, tmp_path / "model")
    model = sact.create_model("resnet20_cifar", pretrained=tmp_path / "model")  # no arguments repeated
    assert model.sact_config["kwargs"] == {"mode": "sact", "base_channels": 8, "num_classes": 7}
    assert _same(model.state_dict(), saved.state_dict(), saved.state_dict())
    ft = sact.create_model("resnet20_cifar", num_classes=3, pretrained=tmp_path / "model")  # a fresh classifier
    assert ft.num_classes == 3 and ft.sact_config["kwargs"]["base_channels"] == 8
    with pytest.raises(CheckpointError, match=re.escape("base_channels=4 (saved with 8)")):
        sact.create_model("resnet20_cifar", base_channels=4, pretrained=tmp_path / "model")
    # an argument the checkpoint left at its default differs from that default
    sact.save_checkpoint(sact.create_model("resnet20_cifar", mode="vanilla"), tmp_path / "default")
    with pytest.raises(CheckpointError, match=re.escape("base_channels=4 (saved with 16)")):
        sact.create_model("resnet20_cifar", base_channels=4, pretrained=tmp_path / "default")


def test_init_takes_a_plain_safetensors(tmp_path):
    from sact.engine import warm_start

    saved = _tiny(mode="vanilla")
    save_file(saved.state_dict(), tmp_path / "plain.safetensors")
    model = sact.create_model("resnet20_cifar", base_channels=4)
    assert "state dict" in warm_start(model, tmp_path / "plain.safetensors")
    assert _same(model.state_dict(), saved.state_dict(), saved.state_dict())
