"""Tests of frame-by-frame inference: streaming a unidirectional TSM equals running it on the whole clip."""

import pytest
import torch
from torch import nn

from ssv2prep.errors import ConfigError
from ssv2prep.models.online import OnlineTSM
from ssv2prep.models.tsm import ModelConfig, build_tsm


def _trained_looking(cfg: ModelConfig, seed: int) -> nn.Module:
    """Build, calibrate BN statistics on random clips (one train-mode pass, momentum 1), scale up the classifier.

    Without calibration a random-init network in eval mode gives almost input-independent logits, which would
    make an online == offline comparison meaningless.
    """
    torch.manual_seed(seed)
    model = build_tsm(cfg)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(2, cfg.num_segments, 3, 48, 48))
    model.new_fc.weight.data.normal_(0, 1)
    return model.eval()


def _stream(online: OnlineTSM, clips: torch.Tensor) -> list[torch.Tensor]:
    n, t, _, h, w = clips.shape
    cache = online.init_cache(n, "cpu", height=h, width=w)
    logits = []
    for i in range(t):
        out, cache = online.step(clips[:, i], cache)
        logits.append(out)
    return logits


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
# (all channels, "block") is left out: there every block input is entirely the previous frame's, so with more
# blocks than frames the output no longer depends on the clip at all (a property of the naive shift, not a bug).
@pytest.mark.parametrize(("place", "shift_div"), [("blockres", 8), ("block", 8), ("blockres", 1)])
def test_online_equals_offline(backbone, place, shift_div):
    cfg = ModelConfig(
        backbone=backbone,
        num_classes=11,
        num_segments=4,
        shift_div=shift_div,
        shift_mode="unidirectional",
        shift_place=place,
    )
    model = _trained_looking(cfg, seed=1)
    clips = torch.randn(2, 4, 3, 48, 48)
    online = OnlineTSM(model)
    with torch.no_grad():
        offline = model(clips)
        per_frame = _stream(online, clips)
        # the same frame with an empty past (zero cache) gives other logits: the cache carries information
        fresh = online.step(clips[:, 2], online.init_cache(2, "cpu", height=48, width=48))[0]
    streamed = torch.stack(per_frame, dim=1).mean(dim=1)
    assert streamed.shape == (2, 11)
    assert (offline[0] - offline[1]).abs().max() > 0.1 * offline.abs().max()  # logits depend on the input
    assert torch.allclose(streamed, offline, rtol=1e-5, atol=1e-5 * offline.abs().max().item())
    assert not torch.allclose(fresh, per_frame[2], atol=1e-3 * per_frame[2].abs().max().item())


def test_online_cache_shapes_match_official_demo():
    # online_demo/main.py feeds MobileNetV2 10 buffers: 3x56x56, 2x 4x28x28, 3x 8x14x14, 2x 12x14x14, 2x 20x7x7
    model = build_tsm(ModelConfig(backbone="mobilenet_v2", num_classes=27, shift_mode="unidirectional"))
    cache = OnlineTSM(model).init_cache(1, "cpu")
    expected = [(3, 56, 56), (4, 28, 28), (4, 28, 28), (8, 14, 14), (8, 14, 14), (8, 14, 14)]
    expected += [(12, 14, 14), (12, 14, 14), (20, 7, 7), (20, 7, 7)]
    assert [tuple(c.shape) for c in cache] == [(1, *s) for s in expected]
    assert all(torch.count_nonzero(c) == 0 for c in cache)


def test_online_step_returns_the_previous_frame_channels():
    model = _trained_looking(
        ModelConfig(backbone="resnet18", num_classes=3, num_segments=2, shift_mode="unidirectional"), 2
    )
    online = OnlineTSM(model)
    cache = online.init_cache(1, "cpu", height=32, width=32)
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, cache = online.step(frame, cache)
        stem = model.base_model.maxpool(model.base_model.relu(model.base_model.bn1(model.base_model.conv1(frame))))
    # the first shifted layer (layer1.0.conv1) caches the first C//8 = 8 channels of its input, the stem output
    assert cache[0].shape == (1, 8, 8, 8)
    assert torch.allclose(cache[0], stem[:, :8])


def test_tsn_streams_with_empty_cache():
    model = _trained_looking(ModelConfig(backbone="resnet18", num_classes=5, num_segments=3, shift_div=0), 3)
    clips = torch.randn(1, 3, 3, 32, 32)
    online = OnlineTSM(model)
    assert online.init_cache(1, "cpu", height=32, width=32) == ()
    with torch.no_grad():
        offline = model(clips)
        streamed = torch.stack(_stream(online, clips)).mean(0)
    assert torch.allclose(streamed, offline, rtol=1e-5, atol=1e-5 * offline.abs().max().item())


def test_online_rejects_bidirectional_and_bad_cache():
    with pytest.raises(ConfigError, match="unidirectional"):
        OnlineTSM(build_tsm(ModelConfig(backbone="resnet18", num_classes=3)))
    online = OnlineTSM(build_tsm(ModelConfig(backbone="resnet18", num_classes=3, shift_mode="unidirectional")))
    with pytest.raises(ValueError, match="8 shifted layers"):
        online.step(torch.randn(1, 3, 32, 32), ())
