"""Tests of official-checkpoint import/export and file-name parsing."""

import re

import pytest
import torch
import torchvision
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.models.official import (
    export_official,
    load_official,
    official_name,
    parse_official_name,
)
from ssv2prep.models.shift import temporal_shift_zeros_copy
from ssv2prep.models.tsm import ModelConfig, build_tsm

R50_NAME = "TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth"


def _randomise_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def official_r50(tmp_path_factory):
    """An official-layout checkpoint assembled from a plain torchvision ResNet-50 (random init) + a new_fc."""
    torch.manual_seed(3)
    plain = torchvision.models.resnet50().eval()
    _randomise_bn(plain, seed=4)
    fc = nn.Linear(2048, 174)
    state = {}
    for key, value in plain.state_dict().items():
        if key.startswith("fc."):
            continue
        key = re.sub(r"^(layer\d\.\d+\.conv1)\.weight$", r"\1.net.weight", key)
        state[f"module.base_model.{key}"] = value
    state["module.new_fc.weight"], state["module.new_fc.bias"] = fc.weight.detach(), fc.bias.detach()
    path = tmp_path_factory.mktemp("official") / R50_NAME
    torch.save({"epoch": 45, "arch": "resnet50", "state_dict": state, "best_prec1": 61.2}, path)
    return path, plain, fc, state


def _reference_tsm_r50(plain: nn.Module, fc: nn.Linear, clips: torch.Tensor) -> torch.Tensor:
    """Official TSM forward computed on the plain torchvision model: shift every block's conv1 input, avg over T."""
    n, t = clips.shape[:2]
    hooks = [
        block.conv1.register_forward_pre_hook(lambda _m, args: (temporal_shift_zeros_copy(args[0], t, 8),))
        for stage in (plain.layer1, plain.layer2, plain.layer3, plain.layer4)
        for block in stage
    ]
    try:
        trunk = nn.Sequential(*list(plain.children())[:-1])
        features = trunk(clips.flatten(0, 1)).flatten(1)
    finally:
        for hook in hooks:
            hook.remove()
    return fc(features).view(n, t, -1).mean(1)


def test_official_checkpoint_has_official_key_count(official_r50):
    _, _, _, state = official_r50
    assert len(state) == 320
    assert sum(".net." in k for k in state) == 16
    assert "module.base_model.layer1.0.conv1.net.weight" in state


def test_load_official_resnet50_matches_reference(official_r50):
    path, plain, fc, _ = official_r50
    model, cfg = load_official(path)
    assert (cfg.backbone, cfg.shift_div, cfg.shift_place, cfg.num_segments, cfg.num_classes) == (
        "resnet50",
        8,
        "blockres",
        8,
        174,
    )
    assert cfg.shift_mode == "bidirectional" and not model.training
    clips = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        ours = model(clips)
        reference = _reference_tsm_r50(plain, fc, clips)
    assert ours.shape == (1, 174)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)


def test_load_official_tsn_equals_plain_torchvision(tmp_path):
    torch.manual_seed(5)
    plain = torchvision.models.resnet18(num_classes=27).eval()
    _randomise_bn(plain, seed=6)
    state = {f"module.base_model.{k}": v for k, v in plain.state_dict().items() if not k.startswith("fc.")}
    state |= {"module.new_fc.weight": plain.fc.weight, "module.new_fc.bias": plain.fc.bias}
    path = tmp_path / "TSM_jester_RGB_resnet18_avg_segment4_e30.pth"
    torch.save({"state_dict": state}, path)
    model, cfg = load_official(path)
    assert (cfg.shift_div, cfg.num_classes, cfg.num_segments) == (0, 27, 4)
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = plain(clips.flatten(0, 1)).view(2, 4, 27).mean(1)
        assert torch.allclose(model(clips), expected, atol=1e-5)


def test_wrong_checkpoint_lists_keys(official_r50, tmp_path):
    _, _, _, state = official_r50
    broken = dict(state)
    del broken["module.base_model.layer2.0.bn1.weight"]
    broken["module.base_model.extra.weight"] = torch.zeros(1)
    path = tmp_path / R50_NAME
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointError) as err:
        load_official(path)
    message = str(err.value)
    assert "\n" not in message and R50_NAME in message
    assert "1 missing keys ['base_model.layer2.0.bn1.weight']" in message
    assert "1 unexpected keys ['base_model.extra.weight']" in message


def test_mislabelled_place_lists_first_ten_keys(official_r50, tmp_path):
    _, _, _, state = official_r50
    path = tmp_path / R50_NAME.replace("blockres", "block")
    torch.save(state, path)
    # "block" wraps whole blocks: every block key moves under .net (num_batches_tracked may be absent, not listed)
    with pytest.raises(CheckpointError, match=r"260 missing keys \[.*\] \.\.\.; 312 unexpected keys") as err:
        load_official(path)
    listed = re.findall(r"'([^']+)'", str(err.value))
    assert len(listed) == 20
    assert listed[0] == "base_model.layer1.0.net.conv1.weight" and listed[10] == "base_model.layer1.0.conv1.net.weight"


def test_shape_mismatch_and_unreadable_files(official_r50, tmp_path):
    _, _, _, state = official_r50
    path = tmp_path / R50_NAME
    torch.save(state, path)
    bad = dict(state)
    bad["module.base_model.conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, path)
    with pytest.raises(
        CheckpointError, match=r"1 shape mismatches.*base_model.conv1.weight \(64, 3, 5, 5\) vs \(64, 3, 7, 7\)"
    ):
        load_official(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_official(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="neither a state dict"):
        load_official(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official(tmp_path / R50_NAME.replace("e45", "e46"))


def test_bare_state_dict_without_num_batches_tracked_and_compiled_prefix(official_r50, tmp_path):
    path, _, _, state = official_r50
    reference, _ = load_official(path)
    legacy = {k.replace("module.", "_orig_mod."): v for k, v in state.items() if "num_batches_tracked" not in k}
    legacy_path = tmp_path / "old" / R50_NAME
    legacy_path.parent.mkdir()
    torch.save(legacy, legacy_path)
    model, _ = load_official(legacy_path)
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert key.endswith("num_batches_tracked") or torch.equal(a, b)


@pytest.mark.parametrize(
    ("cfg", "dataset"),
    [
        (ModelConfig(backbone="resnet18", num_segments=4, num_classes=174), "somethingv2"),
        (ModelConfig(backbone="resnet18", num_segments=4, num_classes=10, shift_place="block"), "mine"),
        (ModelConfig(backbone="resnet34", num_segments=2, num_classes=27, shift_div=0), "jester"),
    ],
)
def test_export_load_round_trip(cfg, dataset, tmp_path):
    torch.manual_seed(7)
    model = build_tsm(cfg).eval()
    _randomise_bn(model, seed=8)
    path = export_official(model, tmp_path, dataset=dataset, epochs=12, best_prec1=33.5)
    assert path.name == official_name(cfg, dataset=dataset, epochs=12)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert set(payload) == {"epoch", "arch", "state_dict", "best_prec1"}
    assert (payload["epoch"], payload["arch"], payload["best_prec1"]) == (12, cfg.backbone, 33.5)
    assert all(k.startswith("module.base_model.") or k.startswith("module.new_fc.") for k in payload["state_dict"])
    loaded, loaded_cfg = load_official(path)
    assert loaded_cfg == cfg
    for (k1, a), (k2, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(a, b)
    clips = torch.randn(1, cfg.num_segments, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(clips), model(clips))


def test_mobilenet_export_uses_official_keys_and_round_trips(tmp_path):
    torch.manual_seed(9)
    cfg = ModelConfig(backbone="mobilenet_v2", num_segments=4, num_classes=27)
    model = build_tsm(cfg).eval()
    _randomise_bn(model, seed=10)
    path = export_official(model, tmp_path, dataset="jester", epochs=25)
    assert path.name == "TSM_jester_RGB_mobilenetv2_shift8_blockres_avg_segment4_e25.pth"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(payload["state_dict"])
    # the official MobileNetV2 is a flat Sequential per block: conv, bn, relu, conv, bn, relu, conv, bn
    prefix = "module.base_model.features."
    expected_some = [
        "0.0.weight", "0.1.running_var", "1.conv.0.weight", "1.conv.1.bias", "1.conv.3.weight", "1.conv.4.weight",
        "2.conv.0.weight", "2.conv.3.weight", "2.conv.7.num_batches_tracked", "3.conv.0.net.weight",
        "3.conv.1.weight", "3.conv.6.weight", "16.conv.0.net.weight", "17.conv.0.weight", "18.1.running_mean",
    ]  # fmt: skip
    assert {prefix + k for k in expected_some} <= keys
    assert len(keys) == 314 and sum(".net." in k for k in keys) == 10
    assert payload["arch"] == "mobilenetv2"
    # legacy MobileNet checkpoints keep the classifier at base_model.classifier
    legacy = {k.replace("module.new_fc.", "module.base_model.classifier."): v for k, v in payload["state_dict"].items()}
    torch.save({"state_dict": legacy}, path)
    loaded, loaded_cfg = load_official(path)
    assert loaded_cfg == cfg
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(clips), model(clips))


def test_dropout_zero_official_checkpoint_fc_becomes_new_fc(tmp_path):
    model = build_tsm(ModelConfig(backbone="resnet18", num_segments=2, num_classes=5)).eval()
    state = {f"module.{k}".replace("new_fc.", "base_model.fc."): v for k, v in model.state_dict().items()}
    path = tmp_path / "TSM_somethingv2_RGB_resnet18_shift8_blockres_avg_segment2_e1.pth"
    torch.save({"state_dict": state}, path)
    loaded, cfg = load_official(path, {"dropout": 0.0})
    assert cfg.num_classes == 5 and cfg.dropout == 0.0
    assert torch.equal(loaded.new_fc.weight, model.new_fc.weight)


def test_cfg_overrides(official_r50, tmp_path):
    path = official_r50[0]
    model, cfg = load_official(path, {"num_segments": 4, "partial_bn": True})
    assert cfg.num_segments == 4 and cfg.partial_bn and model(torch.randn(1, 4, 3, 32, 32)).shape == (1, 174)
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="cannot infer the model"):
        load_official(renamed)
    arch = {"backbone": "resnet50", "shift_div": 8, "shift_place": "blockres", "num_segments": 8}
    _, cfg = load_official(renamed, arch)
    assert (cfg.backbone, cfg.num_classes) == ("resnet50", 174)
    with pytest.raises(ConfigError, match="unknown model settings"):
        load_official(path, {"depth": 50})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (R50_NAME, ("somethingv2", "resnet50", 8, "blockres", 8, 45, 174, [])),
        (
            "/ckpt/TSM_somethingv2_RGB_resnet101_shift8_blockres_avg_segment16_e45.pth",
            ("somethingv2", "resnet101", 8, "blockres", 16, 45, 174, []),
        ),
        (
            "TSM_kinetics_RGB_mobilenetv2_shift8_blockres_avg_segment8_e100_dense.pth",
            ("kinetics", "mobilenet_v2", 8, "blockres", 8, 100, 400, ["dense"]),
        ),
        ("TSM_kinetics_RGB_resnet50_avg_segment5_e50.pth", ("kinetics", "resnet50", 0, "blockres", 5, 50, 400, [])),
        (
            "TSM_something_RGB_resnet50_shift4_block_avg_segment8_e45.pth.tar",
            ("something", "resnet50", 4, "block", 8, 45, 174, []),
        ),
        (
            "TSM_jester_RGB_resnet18_shift8_blockres_avg_segment8_e25.pth",
            ("jester", "resnet18", 8, "blockres", 8, 25, 27, []),
        ),
        (
            "TSM_mydata_RGB_resnet34_shift8_blockres_avg_segment8_e5_dense.pth",
            ("mydata", "resnet34", 8, "blockres", 8, 5, None, ["dense"]),
        ),
        (  # the official MobileNetV2 ignores the place token: always conv[0] of the residual blocks
            "TSM_jester_RGB_mobilenetv2_shift8_block_avg_segment8_e25.pth",
            ("jester", "mobilenet_v2", 8, "blockres", 8, 25, 27, []),
        ),
    ],
)
def test_parse_official_name(name, expected):
    parsed = parse_official_name(name)
    fields = ("dataset", "backbone", "shift_div", "shift_place", "num_segments", "epochs", "num_classes", "suffixes")
    assert tuple(parsed[f] for f in fields) == expected
    assert parsed["shift_mode"] == "bidirectional"  # the only mode the official code has


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet50.pth", "cannot infer"),
        ("TSM_somethingv2_Flow_resnet50_shift8_blockres_avg_segment8_e45.pth", "modality"),
        ("TSM_kinetics_RGB_BNInception_avg_segment8_e45.pth", "arch"),
        ("TSM_kinetics_RGB_resnet50_shift8_blockres_tpool_avg_segment8_e50.pth", "temporal pool"),
        ("TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50_nl.pth", "non-local"),
        ("TSM_somethingv2_RGB_resnet50_shift1_blockres_avg_segment8_e45.pth", "all channels from frame t\\+1"),
        ("TSM_mydata_RGB_resnet34_shift8_blockres_avg_segment8_e5_unidir.pth", "runs this file as a bidirectional"),
    ],
)
def test_parse_official_name_rejects(name, match):
    with pytest.raises(CheckpointError, match=match):
        parse_official_name(name)


def test_official_name():
    assert official_name(ModelConfig()) == R50_NAME
    assert official_name(ModelConfig(shift_div=0, num_segments=5), dataset="kinetics", epochs=50) == (
        "TSM_kinetics_RGB_resnet50_avg_segment5_e50.pth"
    )
    assert official_name(ModelConfig(shift_div=4, shift_place="block"), dataset="ssv2-mini", epochs=3) == (
        "TSM_ssv2-mini_RGB_resnet50_shift4_block_avg_segment8_e3.pth"
    )
    with pytest.raises(ConfigError, match="--dataset 'mini_kinetics'"):
        official_name(ModelConfig(), dataset="mini_kinetics")


@pytest.mark.parametrize("dataset", ["../../x", "a/b", "..", "", "x.pth", "/abs"])
def test_dataset_names_never_leave_the_export_folder(dataset, tmp_path):
    model = build_tsm(ModelConfig(backbone="resnet18", num_segments=2, num_classes=4))
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(ConfigError, match="--dataset"):
        export_official(model, out, dataset=dataset)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (ModelConfig(backbone="resnet18", shift_mode="unidirectional"), "no unidirectional shift"),
        (ModelConfig(backbone="resnet18", shift_div=1), "all channels from frame t\\+1"),
        (ModelConfig(backbone="mobilenet_v2", shift_place="block"), "always shifted 'blockres'"),
        (ModelConfig(backbone="mobilenet_v2", shift_mode="unidirectional", shift_div=1), "no unidirectional"),
    ],
)
def test_export_refuses_models_the_official_code_would_run_differently(cfg, match, tmp_path):
    model = build_tsm(cfg)
    with pytest.raises(CheckpointError, match=match):
        export_official(model, tmp_path)
    with pytest.raises(CheckpointError, match=match):
        official_name(cfg)
    assert list(tmp_path.iterdir()) == []


def _official_reference_shift1(x: torch.Tensor, t: int) -> torch.Tensor:
    """The official `TemporalShift.shift` with n_div=1: fold = C, so every channel comes from t+1 (zeros at T-1)."""
    x5 = x.view(-1, t, *x.shape[1:])
    out = torch.zeros_like(x5)
    out[:, :-1] = x5[:, 1:]
    return out.view_as(x)


def test_shift1_official_meaning_differs_from_ours_so_the_file_is_refused(official_r50, tmp_path):
    """Why shift1 files are refused: our shift-div 1 network is another function than the official one."""
    from ssv2prep.models.shift import TemporalShift

    ours = TemporalShift(nn.Identity(), num_segments=4, fold_div=1, mode="bidirectional")
    x = torch.randn(8, 6, 2, 2)
    assert not torch.equal(ours(x), _official_reference_shift1(x, 4))
    _, _, _, state = official_r50
    path = tmp_path / R50_NAME.replace("shift8", "shift1")
    torch.save({"state_dict": state}, path)  # the same keys: it would load, as another network
    with pytest.raises(CheckpointError, match="shift1") as err:
        load_official(path)
    assert path.name in str(err.value) and "\n" not in str(err.value)


def test_official_mobilenet_block_name_loads_as_the_official_code_builds_it(tmp_path):
    torch.manual_seed(11)
    cfg = ModelConfig(backbone="mobilenet_v2", num_segments=4, num_classes=27)
    model = build_tsm(cfg).eval()
    path = export_official(model, tmp_path, dataset="jester", epochs=25)
    renamed = path.with_name(path.name.replace("_blockres_", "_block_"))
    path.rename(renamed)
    loaded, loaded_cfg = load_official(renamed)
    assert loaded_cfg.shift_place == "blockres"
    clips = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(clips), model(clips))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_official_file_says_corrupt(official_r50, tmp_path, damage):
    data = official_r50[0].read_bytes()
    path = tmp_path / R50_NAME
    path.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "garbage": b"\x80\x02garbage"}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_official(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    renamed = tmp_path / "weights.pth"  # a name we cannot parse: the corruption is still what is reported
    path.rename(renamed)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_official(renamed)


def test_export_to_an_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path):
    model = build_tsm(ModelConfig(backbone="resnet18", num_segments=2, num_classes=174))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write") as err:
        export_official(model, tmp_path / "file" / "sub")
    assert str(tmp_path / "file" / "sub") in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file"]
