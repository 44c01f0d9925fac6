"""The sweep's comparison plot: values on the bars, the chance level, a title."""

from __future__ import annotations

from ssv2prep.sweep import VariantResult, comparison_figure


def _eval(top1: float) -> list[dict[str, object]]:
    return [{"folder": "eval", "crops": 1, "clips": 1, "top1": top1, "top5": 100.0}]


def test_comparison_plot_labels_values_and_chance() -> None:
    results = [
        VariantResult("tsn", "none (TSN)", _eval(26.4), 11.04),
        VariantResult("tsm", "1/8 bidirectional blockres", _eval(97.25), 11.8),
        VariantResult("uni", "1/8 unidirectional blockres", _eval(91.0), None),
    ]
    fig = comparison_figure(results, crop=32, num_classes=4)
    acc, lat = fig.axes
    assert [t.get_text() for t in acc.texts if not t.get_text().startswith("chance")] == ["26.4", "97.2", "91.0"]
    assert [t.get_text() for t in lat.texts] == ["11.0", "11.8", "-"]
    chance = [line for line in acc.lines if line.get_linestyle() == "--"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [25.0, 25.0]
    assert any(t.get_text() == "chance 25.0%" for t in acc.texts)
    assert fig._suptitle.get_text() == "3 variants, 4 classes"
    assert "eval top-1 (%), 1 crop x 1 clip" in acc.get_ylabel()
