"""The detection backbone adapter: shapes for every registered model and mode, freezing, warm starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sact
from sact.detection import SACTBackbone, build_detector, freeze_batchnorm, load_backbone_weights


def _tiny(name: str, mode: str, in_chans: int = 1) -> nn.Module:
    width = {"base_channels": 4} if name.endswith("_cifar") else {"base_width": 8}
    torch.manual_seed(0)
    model = sact.create_model(name, mode=mode, in_chans=in_chans, **width)
    # non-trivial halting: random BN statistics and halting biases near 0
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    for stage in model.stages:
        for branch in stage.halting or []:
            for p in branch.parameters():
                if p.dim() == 1 and p.numel() == 1:
                    p.data.fill_(0.5)
    return model.eval()


@pytest.mark.parametrize("mode", ["vanilla", "act", "sact"])
@pytest.mark.parametrize("name", sact.list_models())
def test_feature_shapes_flops_and_ponder_match_the_model(name, mode):
    torch.set_num_threads(1)
    model = _tiny(name, mode)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)  # BatchNorm2d in eval mode
    backbone = SACTBackbone(model, return_stages=model.stage_names, frozen_bn=True, out_channels=8).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # all frozen, halting BNs too
    with torch.no_grad():
        out = backbone.forward_with_ponder(x)
    names = list(model.stage_names) + ["pool"]
    assert list(out.features) == names == list(backbone.feature_names)
    for stage_name, feat in zip(model.stage_names, ref.features):
        assert out.features[stage_name].shape == (2, 8, *feat.shape[-2:])
        assert backbone.strides[stage_name] == 64 // feat.shape[-1]
    last = out.features[model.stage_names[-1]]
    assert out.features["pool"].shape == (2, 8, (last.shape[-2] + 1) // 2, (last.shape[-1] + 1) // 2)
    # FrozenBatchNorm2d computes what BatchNorm2d does in eval mode: same FLOPs, same ponder maps
    assert torch.equal(out.flops, ref.flops)
    assert len(out.stages) == len(ref.stages)
    for a, b in zip(out.stages, ref.stages):
        torch.testing.assert_close(a.ponder_map, b.ponder_map, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.num_units, b.num_units)
    torch.testing.assert_close(out.ponder_cost, sum(s.ponder_cost for s in ref.stages), rtol=1e-4, atol=1e-4)
    assert backbone(x).keys() == out.features.keys()  # the torchvision protocol


def test_default_stages_skip_stride_one_and_later_stages_do_not_run():
    cifar = SACTBackbone(_tiny("resnet20_cifar", "sact"), out_channels=8)
    assert cifar.return_stages == ("layer2", "layer3")
    r50 = SACTBackbone(_tiny("resnet50", "sact"), out_channels=8)
    assert r50.return_stages == ("layer1", "layer2", "layer3", "layer4")
    short = SACTBackbone(_tiny("resnet50", "sact"), return_stages=("layer2", "layer3"), out_channels=8)
    out = short.forward_with_ponder(torch.rand(1, 1, 64, 64))
    assert len(out.stages) == 3 and list(out.features) == ["layer2", "layer3", "pool"]
    assert not any(p.requires_grad for p in short.body.layer4.parameters())


def test_trainable_layers_frozen_stem_and_halting():
    model = _tiny("resnet50", "sact")
    bb = SACTBackbone(model, trainable_layers=2, out_channels=8)
    grads = lambda m: {p.requires_grad for n, p in m.named_parameters() if ".halting." not in f".{n}"}  # noqa: E731
    assert grads(bb.body.layer4) == {True} and grads(bb.body.layer3) == {True}
    assert grads(bb.body.layer2) == {False} and grads(bb.body.layer1) == {False}
    assert not bb.body.conv1.weight.requires_grad and not bb.body.fc.weight.requires_grad
    assert all(p.requires_grad for p in bb.body.layer1.halting.parameters())  # fresh after warm starts
    assert all(p.requires_grad for p in bb.fpn.parameters())
    bb2 = SACTBackbone(_tiny("resnet50", "sact"), trainable_layers=0, train_halting=False, frozen_stem=False,
                       out_channels=8)
    trainable = {n.split(".")[0] for n, p in bb2.body.named_parameters() if p.requires_grad}
    assert trainable == {"conv1"}  # frozen_stem=False overrides; FrozenBN has no parameters
    full = SACTBackbone(_tiny("resnet20_cifar", "vanilla"), frozen_bn=False, out_channels=8)
    assert full.body.stem.weight.requires_grad and isinstance(full.body.layer2[0].bn1, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"return_stages": ("layer9",)}, "layer9"), ({"return_stages": ()}, "return_stages"),
     ({"trainable_layers": 6}, "6"), ({"out_channels": 0}, "0")],
)
def test_invalid_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SACTBackbone(_tiny("resnet50", "act"), **kwargs)
    with pytest.raises(ValueError, match="AdaptiveResNet"):
        SACTBackbone(nn.Conv2d(1, 1, 1))


def test_freeze_batchnorm_keeps_eval_function():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    seq = nn.Sequential(nn.Identity(), bn)
    want = seq(x)
    freeze_batchnorm(seq)
    from torchvision.ops import FrozenBatchNorm2d

    assert isinstance(seq[1], FrozenBatchNorm2d)
    torch.testing.assert_close(seq(x), want, rtol=1e-5, atol=1e-5)


def test_warm_start_from_sact_checkpoint_and_torchvision_file(tmp_path):
    src = sact.create_model("resnet50", mode="vanilla", in_chans=3, base_width=8, num_classes=7)
    for p in src.parameters():
        p.data.normal_()
    sact.save_checkpoint(src, tmp_path / "cls")
    torch.save({"model": src.state_dict()}, tmp_path / "tv.pth")
    for path in (tmp_path / "cls", tmp_path / "tv.pth"):
        dst = sact.create_model("resnet50", mode="sact", in_chans=1, base_width=8, num_classes=11)
        halting_before = dst.layer2.halting[0].local_conv.weight.clone()
        load_backbone_weights(dst, path)
        torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))  # RGB stem summed
        assert torch.equal(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
        assert torch.equal(dst.layer2.halting[0].local_conv.weight, halting_before)  # halting keeps its init
    other = sact.create_model("resnet101", mode="sact", base_width=8)
    with pytest.raises(ValueError, match="resnet50"):
        load_backbone_weights(other, tmp_path / "cls")


def test_plain_torchvision_fasterrcnn_accepts_the_backbone():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    bb = SACTBackbone(_tiny("resnet20_cifar", "sact"), out_channels=8)
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((1.0,),) * 3)
    from torchvision.ops import MultiScaleRoIAlign

    det = FasterRCNN(bb, num_classes=3, rpn_anchor_generator=anchors, min_size=64, max_size=64,
                     box_roi_pool=MultiScaleRoIAlign(["layer2", "layer3"], 7, 2), image_mean=[0.0], image_std=[1.0])
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(1, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_build_detector_defaults_for_small_images():
    det = build_detector(_tiny("resnet20_cifar", "sact"), num_classes=11, out_channels=8, min_size=64, max_size=64,
                         representation_size=16)
    assert det.detector_config["anchor_sizes"] == [16, 32, 64]  # 8 * stride per level
    assert det.transform.image_mean == [0.0] and det.transform.image_std == [1.0]
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector(_tiny("resnet20_cifar", "sact"), num_classes=11, anchor_sizes=[8, 16])
    with pytest.raises(ValueError, match="num_classes"):
        build_detector(_tiny("resnet20_cifar", "sact"), num_classes=1)
    with pytest.raises(ValueError, match="image_mean"):
        build_detector(_tiny("resnet20_cifar", "sact"), num_classes=3, image_mean=[0.5, 0.5, 0.5])
