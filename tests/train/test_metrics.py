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


def _cm(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 3, size=(k, k))
    np.fill_diagonal(cm, 20)
    return cm


def test_confusion_plot_names_classes_and_has_a_row_normalised_colour_bar() -> None:
    from ssv2prep.train.evaluation import confusion_figure

    classes = ["Pushing something from left to right", "Pushing something from right to left", "Moving up", "down"]
    fig = confusion_figure(_cm(4), classes, "ckpt on val: top-1 80.0%")
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == classes == [t.get_text() for t in ax.get_xticklabels()]
    assert "each row sums to 1" in bar.get_ylabel()
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(image.sum(axis=1), 1.0)
    assert ax.get_title() == "ckpt on val: top-1 80.0%"  # short titles stay on one line


def test_at_174_classes_the_most_confused_pairs_are_named_in_a_readable_plot(tmp_path) -> None:
    from PIL import Image

    from ssv2prep.train.evaluation import confusion_figure, most_confused, most_confused_figure

    classes = [f"Class {i} doing something to something" for i in range(174)]
    cm = _cm(174)
    cm[86, 87], cm[87, 86] = 15, 4  # a mirror pair confused: 15 of 37 and 4 of 26 (with the diagonal's 20 and noise)
    pairs = most_confused(cm, classes, limit=10)
    assert (pairs[0]["true"], pairs[0]["predicted"], pairs[0]["videos"]) == (classes[86], classes[87], 15)
    assert pairs[0]["percent"] == round(100 * 15 / cm[86].sum(), 2)
    assert [p["percent"] for p in pairs] == sorted((p["percent"] for p in pairs), reverse=True)
    fig = most_confused_figure(pairs, "most confused")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == f"{classes[86]} -> {classes[87]}" and len(labels) == 10
    heat = confusion_figure(cm, classes, "t")
    path = tmp_path / "c.png"
    heat.savefig(path)
    with Image.open(path) as image:
        assert max(image.size) <= 1600  # 174 classes: index ticks, not 174 unreadable names
    assert len(heat.axes[0].get_yticklabels()) <= 12
