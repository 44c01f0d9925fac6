"""Metrics on a hand-made case: known logits -> known top-1, top-5, mean class accuracy and confusion."""

import numpy as np
import torch

from ssv2prep.train.metrics import confusion_matrix, topk_correct, video_metrics


def test_topk_on_a_hand_made_case() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 2])
    # top-1: rows 0 and 3 right; top-2: row 1 (label 1 second) and row 2 (label 1 second) too
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == [2, 4, 4]


def test_video_metrics_hand_made() -> None:
    # 6 videos, 3 classes. Predictions (argmax): 0, 0, 1, 2, 2, 2; labels: 0, 1, 1, 1, 2, 2
    scores = np.array([[5, 1, 0], [4, 3, 0], [0, 5, 1], [0, 1, 4], [1, 0, 9], [0, 2, 3]], dtype=np.float32)
    labels = np.array([0, 1, 1, 1, 2, 2])
    m = video_metrics(scores, labels, 3)
    assert m.num_videos == 6
    assert m.top1 == 100 * 4 / 6
    assert m.top5 == 100.0  # K = 3: every label is in the top 3
    np.testing.assert_array_equal(m.confusion, [[1, 0, 0], [1, 1, 1], [0, 0, 2]])
    np.testing.assert_allclose(m.per_class, [1.0, 1 / 3, 1.0])
    assert abs(m.mean_class_accuracy - 100 * (1 + 1 / 3 + 1) / 3) < 1e-9


def test_unlabelled_videos_are_left_out_and_empty_classes_are_nan() -> None:
    scores = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    m = video_metrics(scores, np.array([0, -1, 0]), 3)
    assert m.num_videos == 2 and m.top1 == 50.0
    assert np.isnan(m.per_class[1]) and np.isnan(m.per_class[2]) and m.mean_class_accuracy == 50.0
    assert confusion_matrix(np.array([2]), np.array([0]), 3)[0, 2] == 1


def test_top_hits_stay_a_tensor_and_count_like_topk_correct() -> None:
    from ssv2prep.train.metrics import top_hits

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    hits = top_hits(logits, labels, ks=(1, 2))
    assert isinstance(hits, torch.Tensor) and hits.dtype == torch.int64
    assert hits.tolist() == [1, 2]  # row 0 top-1; row 2's label is its second best; row 1's is its last
    assert top_hits(logits[:0], labels[:0]).tolist() == [0, 0]
