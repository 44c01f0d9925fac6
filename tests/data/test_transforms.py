"""uint8 clip transforms against the official formulas (sizes, offsets, crop positions) and PIL's resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssv2prep.data import transforms as tf
from ssv2prep.data.transforms import TrainCrop


def coord_frames(width: int, height: int, n: int = 2) -> torch.Tensor:
    """uint8 (n, 3, H, W): R = x mod 256, G = y mod 256, B = frame number, so a crop's pixels tell where it is."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frames = [torch.stack([xs % 256, ys % 256, torch.full_like(xs, t)]) for t in range(n)]
    return torch.stack(frames).to(torch.uint8)


def test_resized_size_follows_torchvision_resize() -> None:
    assert tf.resized_size(320, 240, 256) == (341, 256)
    assert tf.resized_size(240, 320, 256) == (256, 341)
    assert tf.resized_size(400, 256, 256) == (400, 256)
    assert tf.resized_size(78, 48, 40) == (65, 40)


def test_multiscale_sizes_for_a_256_short_side() -> None:
    assert tf.multiscale_crop_sizes(256, 224) == [256, 224, 192, 168]
    assert tf.multiscale_crop_sizes(255, 224) == [255, 224, 191, 168]  # 223 is within 3 px: snapped to 224
    assert tf.multiscale_crop_sizes(240, 224) == [240, 210, 180, 158]


def test_multiscale_pairs_are_the_ten_with_index_distance_at_most_one() -> None:
    pairs = tf.multiscale_pairs(341, 256, 224)
    assert pairs == [
        (256, 256), (224, 256),
        (256, 224), (224, 224), (192, 224),
        (224, 192), (192, 192), (168, 192),
        (192, 168), (168, 168),
    ]  # fmt: skip
    sizes = [256, 224, 192, 168]
    assert all(abs(sizes.index(w) - sizes.index(h)) <= 1 for w, h in pairs)


def test_thirteen_fixed_offsets() -> None:
    # 341 x 256 frame, 224 crop: w_step = 117 // 4 = 29, h_step = 32 // 4 = 8
    assert tf.fixed_offsets(341, 256, 224, 224) == [
        (0, 0), (116, 0), (0, 32), (116, 32), (58, 16),
        (0, 16), (116, 16), (58, 32), (58, 0),
        (29, 8), (87, 8), (29, 24), (87, 24),
    ]  # fmt: skip
    assert tf.fixed_offsets(341, 256, 224, 224, more=False) == [(0, 0), (116, 0), (0, 32), (116, 32), (58, 16)]
    assert len(tf.fixed_offsets(256, 256, 256, 256)) == 13 == tf.NUM_FIXED_OFFSETS


def test_draws_cover_every_pair_and_offset() -> None:
    rng = np.random.default_rng(0)
    crops = [tf.draw_train_crop(rng, num_pairs=10, flip_prob=0.0) for _ in range(2000)]
    assert {c.pair for c in crops} == set(range(10))
    assert {c.offset for c in crops} == set(range(13))
    assert not any(c.flip for c in crops)
    flips = [tf.draw_train_crop(rng, num_pairs=10, flip_prob=0.5).flip for _ in range(2000)]
    assert 800 < sum(flips) < 1200


def test_train_crop_on_a_256_frame_is_the_official_box_without_resize() -> None:
    frames = coord_frames(341, 256)
    crop = TrainCrop(pair=3, offset=4, flip=False)  # (224, 224) at the centre (58, 16)
    assert tf.train_crop_box(341, 256, crop, crop_size=224, scale_size=256) == (58, 16, 224, 224)
    out = tf.apply_train_crop(frames, crop, crop_size=224, scale_size=256)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.uint8
    assert torch.equal(out, frames[..., 16:240, 58:282])
    mirrored = tf.apply_train_crop(frames, TrainCrop(3, 4, True), crop_size=224, scale_size=256)
    assert torch.equal(mirrored, out.flip(-1))


def test_train_crop_box_maps_back_from_the_virtual_256_frame() -> None:
    # a 160 x 120 frame is treated as its 341 x 256 resize; pair 0 offset 1 is (256 x 256) at x = 4 * 21 = 84
    for pair, offset in [(0, 1), (9, 12), (4, 7)]:
        crop = TrainCrop(pair, offset, False)
        x, y, w, h = tf.train_crop_box(160, 120, crop, crop_size=224, scale_size=256)
        vx, vy, vw, vh = tf.train_crop_box(341, 256, crop, crop_size=224, scale_size=256)
        s = 256 / 120
        assert abs(x * s - vx) <= 2 and abs(y * s - vy) <= 2
        assert abs(w * s - vw) <= 3 and abs(h * s - vh) <= 3
        assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 120
    out = tf.apply_train_crop(coord_frames(160, 120), TrainCrop(0, 1, False), crop_size=224, scale_size=256)
    assert out.shape == (2, 3, 224, 224)


def test_resize_matches_pil_bilinear() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    img = np.stack([(xx * 1.7) % 255, (yy * 2.1) % 255, rng.integers(0, 255, (120, 160))], -1).astype(np.uint8)
    frames = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    for size in [(224, 224), (50, 70)]:
        ours = tf.resize_frames(frames, *size)[0].permute(1, 2, 0).numpy().astype(int)
        ref = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR)).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_eval_crop_positions() -> None:
    # 341 x 256 after the short-side resize, 224 crops: w_step 29, h_step 8
    assert tf.eval_crop_positions(341, 256, 224, 1) == [(58, 16, False)]  # round(58.5) -> 58, round(16) -> 16
    assert tf.eval_crop_positions(341, 256, 224, 3) == [(0, 16, False), (116, 16, False), (58, 16, False)]
    five = [(0, 0, False), (116, 0, False), (0, 32, False), (116, 32, False), (58, 16, False)]
    assert tf.eval_crop_positions(341, 256, 224, 5) == five
    ten = tf.eval_crop_positions(341, 256, 224, 10)
    assert ten[0::2] == five and [p[:2] for p in ten[1::2]] == [p[:2] for p in five] and all(p[2] for p in ten[1::2])
    # full resolution: 256 crops, left / right / centre with h_step 0
    assert tf.eval_crop_positions(341, 256, 256, 3) == [(0, 0, False), (84, 0, False), (42, 0, False)]


@pytest.mark.parametrize("crops", [1, 3, 5, 10])
def test_eval_views_are_the_crops_of_the_rescaled_frames(crops: int) -> None:
    frames = coord_frames(341, 256, n=3)
    views = tf.eval_views(frames, crops=crops, crop_size=224, scale_size=256)
    assert views.shape == (crops, 3, 3, 224, 224) and views.dtype == torch.uint8
    for view, (x, y, mirrored) in zip(views, tf.eval_crop_positions(341, 256, 224, crops), strict=True):
        ref = frames[..., y : y + 224, x : x + 224]
        assert torch.equal(view, ref.flip(-1) if mirrored else ref)


def test_eval_views_rescale_the_short_side_first() -> None:
    frames = coord_frames(160, 120)
    views = tf.eval_views(frames, crops=3, crop_size=224, scale_size=256)
    rescaled = tf.resize_short_side(frames, 256)
    assert rescaled.shape[-2:] == (256, 341)
    assert torch.equal(views[1], rescaled[..., 16:240, 116:340])
    full = tf.eval_views(frames, crops=1, crop_size=224, scale_size=256, full_res=True)
    assert full.shape == (1, 2, 3, 256, 256) and torch.equal(full[0], rescaled[..., :, 42:298])


def test_flip_label_swaps_only_pair_members() -> None:
    pairs = ((86, 87), (93, 94), (166, 167))
    assert [tf.flip_label(x, pairs) for x in (86, 87, 93, 94, 166, 167, 0, 173)] == [87, 86, 94, 93, 167, 166, 0, 173]


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_clips_matches_the_reference(channels_last: bool) -> None:
    clips = torch.randint(0, 256, (2, 4, 3, 8, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = tf.normalize_clips(clips, torch.device("cpu"), channels_last=channels_last)
    # torchvision's ImageNet statistics in RGB order, written out so a BGR or mistyped constant fails here
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = (clips.float() / 255.0 - mean) / std
    assert out.shape == clips.shape and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5)
    flat = out.view(-1, 3, 8, 10)
    assert flat.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(flat, ref.view(-1, 3, 8, 10), atol=1e-5)


def test_normalize_clips_refuses_float_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        tf.normalize_clips(torch.zeros(1, 3, 2, 2), torch.device("cpu"))
