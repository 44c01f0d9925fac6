"""Tests of the TSM builder, its forward contract, partial BN and the optimizer policies."""

import pytest
import torch
import torchvision
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.models.shift import TemporalShift, shift_modules
from ssv2prep.models.tsm import (
    ModelConfig,
    _torchvision_weights,
    build_tsm,
    param_groups,
    strip_wrapper_prefixes,
)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and a classifier with visible logits, so eval outputs discriminate."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    model.new_fc.weight.data.normal_(0, 1, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def resnet50_tsm():
    torch.manual_seed(0)
    return build_tsm(ModelConfig(backbone="resnet50"))


def test_resnet50_state_dict_matches_official_layout(resnet50_tsm):
    keys = list(resnet50_tsm.state_dict())
    assert len(keys) == 320
    assert keys[:2] == ["base_model.conv1.weight", "base_model.bn1.weight"]
    assert keys[-2:] == ["new_fc.weight", "new_fc.bias"]
    net_keys = [k for k in keys if ".net." in k]
    assert len(net_keys) == 16 and all(k.endswith(".conv1.net.weight") for k in net_keys)
    assert not any(k.startswith("base_model.fc") for k in keys)
    shapes = resnet50_tsm.state_dict()
    assert tuple(shapes["base_model.layer1.0.conv1.net.weight"].shape) == (64, 64, 1, 1)
    assert tuple(shapes["base_model.layer1.1.conv1.net.weight"].shape) == (64, 256, 1, 1)
    assert tuple(shapes["new_fc.weight"].shape) == (174, 2048)
    assert isinstance(resnet50_tsm.base_model.fc, nn.Dropout) and resnet50_tsm.base_model.fc.p == 0.5


def test_new_fc_initialisation(resnet50_tsm):
    weight = resnet50_tsm.new_fc.weight
    assert abs(weight.std().item() - 0.001) < 0.00002
    assert abs(weight.mean().item()) < 0.00001
    assert torch.equal(resnet50_tsm.new_fc.bias, torch.zeros(174))


def test_resnet50_param_groups(resnet50_tsm):
    groups = param_groups(resnet50_tsm, lr=0.01, weight_decay=1e-4, fc_lr5=True)
    summary = {g["name"]: (len(g["params"]), g["lr_mult"], g["decay_mult"]) for g in groups}
    assert summary == {
        "first_conv_weight": (1, 1, 1),
        "normal_weight": (52, 1, 1),
        "bn": (106, 1, 0),
        "lr5_weight": (1, 5, 1),
        "lr10_bias": (1, 10, 0),
    }
    by_name = {g["name"]: g for g in groups}
    assert by_name["first_conv_weight"]["params"][0] is resnet50_tsm.base_model.conv1.weight
    assert by_name["lr5_weight"]["params"][0] is resnet50_tsm.new_fc.weight
    assert by_name["lr10_bias"]["lr"] == pytest.approx(0.1) and by_name["lr10_bias"]["weight_decay"] == 0
    assert by_name["normal_weight"]["weight_decay"] == pytest.approx(1e-4)
    # every trainable parameter is in exactly one group
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in resnet50_tsm.parameters())
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the groups are valid optimizer input


def test_param_groups_without_fc_lr5(resnet50_tsm):
    groups = param_groups(resnet50_tsm, lr=0.02, weight_decay=5e-4, fc_lr5=False)
    summary = {g["name"]: (len(g["params"]), g["lr"], g["weight_decay"]) for g in groups}
    assert summary["normal_weight"] == (53, 0.02, 5e-4)
    assert summary["normal_bias"] == (1, pytest.approx(0.04), 0.0)
    assert "lr5_weight" not in summary and "lr10_bias" not in summary


def test_resnet101_shifts_every_other_block():
    model = build_tsm(ModelConfig(backbone="resnet101", num_classes=10))
    # layers of 3, 4, 23, 3 blocks; blocks 0, 2, 4, ... are shifted
    assert len(shift_modules(model)) == 2 + 2 + 12 + 2
    assert isinstance(model.base_model.layer3[22].conv1, TemporalShift)
    assert not isinstance(model.base_model.layer3[21].conv1, TemporalShift)
    keys = model.state_dict()
    assert "base_model.layer3.2.conv1.net.weight" in keys and "base_model.layer3.1.conv1.weight" in keys


@pytest.mark.parametrize(
    ("backbone", "place", "count", "key"),
    [
        ("resnet18", "blockres", 8, "base_model.layer1.0.conv1.net.weight"),
        ("resnet18", "block", 8, "base_model.layer1.0.net.conv1.weight"),
        ("resnet50", "block", 16, "base_model.layer4.2.net.conv3.weight"),
        ("mobilenet_v2", "blockres", 10, "base_model.features.3.conv.0.0.net.weight"),
        ("mobilenet_v2", "block", 10, "base_model.features.3.net.conv.0.0.weight"),
    ],
)
def test_shift_place_key_layout(backbone, place, count, key):
    model = build_tsm(ModelConfig(backbone=backbone, shift_place=place, num_classes=5))
    assert key in model.state_dict()
    shifts = shift_modules(model)
    assert len(shifts) == count
    wrapped = {type(m.net).__name__ for m in shifts}
    blocks = {"BasicBlock", "Bottleneck", "InvertedResidual"}
    assert wrapped == {"Conv2d"} if place == "blockres" else wrapped <= blocks
    assert all(m.num_segments == 8 and m.fold_div == 8 and m.mode == "bidirectional" for m in shifts)


def test_mobilenet_shifts_only_residual_blocks():
    model = build_tsm(ModelConfig(backbone="mobilenet_v2", num_classes=5))
    shifted = [i for i, block in enumerate(model.base_model.features) if shift_modules(block)]
    assert shifted == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert isinstance(model.base_model.classifier, nn.Dropout)
    assert tuple(model.new_fc.weight.shape) == (5, 1280)


def test_tsn_has_no_shift_and_ignores_frame_order():
    torch.manual_seed(0)
    tsn = _randomise(build_tsm(ModelConfig(backbone="resnet18", shift_div=0, num_segments=4, num_classes=7)))
    assert shift_modules(tsn) == []
    clips = torch.randn(2, 4, 3, 32, 32)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out, out_perm = tsn(clips), tsn(clips[:, perm])
    assert out.shape == (2, 7)
    assert (out[0] - out[1]).abs().max() > 0.01 * out.abs().max()  # the logits do depend on the clip
    assert torch.allclose(out, out_perm, rtol=1e-5, atol=1e-6 * out.abs().max().item())
    with torch.no_grad():
        frames_avg = tsn.new_fc(tsn.base_model(clips.flatten(0, 1))).view(2, 4, 7).mean(1)
    assert torch.allclose(out, frames_avg, atol=1e-6)


@pytest.mark.parametrize("mode", ["bidirectional", "unidirectional"])
def test_tsm_depends_on_frame_order(mode):
    torch.manual_seed(0)
    tsm = _randomise(build_tsm(ModelConfig(backbone="resnet18", shift_mode=mode, num_segments=4, num_classes=7)))
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out, out_perm = tsm(clips), tsm(clips[:, torch.tensor([2, 0, 3, 1])])
    assert (out - out_perm).abs().max() > 1e-2 * out.abs().max()


def test_both_input_layouts_give_same_logits():
    torch.manual_seed(0)
    tsm = _randomise(build_tsm(ModelConfig(backbone="resnet18", num_segments=4, num_classes=7)))
    clips = torch.randn(2, 4, 3, 32, 32)
    official_layout = clips.reshape(2, 12, 32, 32)  # channels f0R f0G f0B f1R ...
    assert torch.equal(official_layout[:, 3:6], clips[:, 1])
    with torch.no_grad():
        assert torch.equal(tsm(clips), tsm(official_layout))
    with pytest.raises(ValueError, match="T=4"):
        tsm(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="3T"):
        tsm(torch.randn(1, 13, 32, 32))


def test_dropout_zero_keeps_new_fc():
    model = build_tsm(ModelConfig(backbone="resnet18", dropout=0.0, num_classes=3))
    assert isinstance(model.base_model.fc, nn.Identity)
    assert [k for k in model.state_dict() if "fc" in k] == ["new_fc.weight", "new_fc.bias"]


def test_partial_bn_freezes_all_but_first_bn():
    torch.manual_seed(0)
    model = build_tsm(ModelConfig(backbone="resnet18", num_segments=2, num_classes=3, partial_bn=True)).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[0] is model.base_model.bn1 and bns[0].training and bns[0].weight.requires_grad
    assert all(not bn.training and not bn.weight.requires_grad and not bn.bias.requires_grad for bn in bns[1:])
    before = bns[5].running_mean.clone()
    model(torch.randn(1, 2, 3, 32, 32))
    assert torch.equal(bns[5].running_mean, before)  # frozen BN keeps its statistics
    assert not torch.equal(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))
    groups = {g["name"]: len(g["params"]) for g in param_groups(model, lr=0.1, weight_decay=0.0, fc_lr5=True)}
    assert groups["bn"] == 2


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("backbone", "vgg16", "backbone"),
        ("num_classes", 0, "num_classes"),
        ("num_segments", 2.5, "num_segments"),
        ("shift_div", -1, "shift_div"),
        ("shift_mode", "sideways", "shift_mode"),
        ("shift_place", "stem", "shift_place"),
        ("dropout", 1.0, "dropout"),
        ("weights", "", "weights"),
        ("partial_bn", 1, "partial_bn"),
    ],
)
def test_config_validation(field, value, match):
    cfg = ModelConfig(**{field: value})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    with pytest.raises(ConfigError, match=match):
        build_tsm(cfg)


def test_local_backbone_weights(tmp_path):
    torch.manual_seed(1)
    plain = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}}, path)
    model = build_tsm(ModelConfig(backbone="resnet18", weights=str(path), num_classes=4))
    assert torch.equal(model.base_model.conv1.weight, plain.conv1.weight)
    assert torch.equal(model.base_model.layer2[1].conv1.net.weight, plain.layer2[1].conv1.weight)
    torch.save({"conv1.weight": plain.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        build_tsm(ModelConfig(backbone="resnet18", weights=str(tmp_path / "partial.pth")))
    with pytest.raises(CheckpointError, match="neither a torchvision weights name nor an existing file"):
        build_tsm(ModelConfig(backbone="resnet18", weights=str(tmp_path / "absent.pth")))


def test_torchvision_weights_by_name_resolve_without_download():
    assert _torchvision_weights("resnet50", "imagenet") is torchvision.models.ResNet50_Weights.DEFAULT
    assert _torchvision_weights("resnet50", "IMAGENET1K_V1") is torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    assert _torchvision_weights("mobilenet_v2", "imagenet") is torchvision.models.MobileNet_V2_Weights.DEFAULT
    assert _torchvision_weights("resnet18", "/some/file.pth") is None


def test_strip_wrapper_prefixes():
    state = {"module.a.b": 1, "_orig_mod.c": 2, "module._orig_mod.d": 3, "e.module.f": 4}
    assert strip_wrapper_prefixes(state) == {"a.b": 1, "c": 2, "d": 3, "e.module.f": 4}
