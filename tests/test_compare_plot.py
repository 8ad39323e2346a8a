"""ciou_vs_tokens.png: cIoU and gIoU panels per split, and with 15 methods at the same budgets no two
methods' points (and so intervals) share an x position, nor cross into the neighbouring budget."""

from __future__ import annotations

import numpy as np

BUDGETS = (64, 192)
METHODS = [f"method{index}" for index in range(15)]


def results_table() -> list[dict]:
    """Rows as compare() returns them: an unpruned reference and 15 methods at two budgets, two splits."""
    rows = []
    for split_index, split in enumerate(("val", "testA")):
        rows.append({"split": split, "configuration": "none", "method": "none", "num_tokens": None, "retained_tokens": 576,
                     "ciou": 0.6, "ciou_low": 0.57, "ciou_high": 0.63, "giou": 0.62, "giou_low": 0.6, "giou_high": 0.64})  # fmt: skip
        for index, method in enumerate(METHODS):
            for budget in BUDGETS:
                ciou = 0.3 + 0.01 * index + 0.001 * budget + 0.05 * split_index
                giou = ciou + 0.02
                rows.append({"split": split, "configuration": f"{method}@{budget}", "method": method, "num_tokens": budget,
                             "retained_tokens": budget, "ciou": ciou, "ciou_low": ciou - 0.03, "ciou_high": ciou + 0.03,
                             "giou": giou, "giou_low": giou - 0.02, "giou_high": giou + 0.04})  # fmt: skip
    return rows


def test_dodging_separates_fifteen_methods_within_their_budget(compare_tool):
    factors = compare_tool.dodge_factors(METHODS)
    values = [factors[method] for method in METHODS]
    assert values == sorted(values) and len(set(values)) == 15  # a fixed order, no two alike
    assert np.isclose(values[-1] / values[0], 2**compare_tool.DODGE_WIDTH)
    assert np.isclose(np.prod(values), 1.0)  # centred on the budget (log scale)
    assert 64 * values[-1] < 192 * values[0]  # the 64 group ends before the 192 group starts
    assert compare_tool.dodge_factors(["only"]) == {"only": 1.0}


def test_the_figure_has_a_ciou_and_a_giou_panel_per_split_with_dodged_points(compare_tool):
    import matplotlib.pyplot as plt

    results = results_table()
    figure = compare_tool.draw(results)
    try:
        axes = figure.axes
        assert [axis.get_title() for axis in axes] == ["val: cIoU", "val: gIoU", "testA: cIoU", "testA: gIoU"]
        assert [axis.get_ylabel() for axis in axes] == ["cIoU (%)", "gIoU (%)"] * 2
        for axis, (split, key) in zip(axes, [("val", "ciou"), ("val", "giou"), ("testA", "ciou"), ("testA", "giou")]):
            lines = {container.get_label(): container.lines[0] for container in axis.containers}  # the error bars
            lines.update({line.get_label(): line for line in axis.get_lines() if line.get_label() == "none"})
            assert set(lines) == {"none", *METHODS}
            expected = {row["configuration"]: 100 * row[key] for row in results if row["split"] == split}
            for method in METHODS:
                assert np.allclose(lines[method].get_ydata(), [expected[f"{method}@{budget}"] for budget in BUDGETS])
            assert np.allclose(lines["none"].get_ydata(), expected["none"])  # the reference line across the panel
            for position in range(len(BUDGETS)):
                xs = [lines[method].get_xdata()[position] for method in METHODS]
                assert len(set(np.round(xs, 9))) == len(METHODS)
        assert [text.get_text() for text in figure.legends[0].get_texts()] == ["none", *METHODS]
    finally:
        plt.close(figure)


def test_an_in_llm_method_sits_at_its_budget_not_at_its_last_layer_count(compare_tool):
    """PyramidDrop at 64 averages 64 visual tokens per layer and ends on 4: it is drawn at 64, beside
    the methods it is matched with, and the table shows both numbers."""
    import matplotlib.pyplot as plt

    rows = [row for row in results_table() if row["split"] == "val" and row["method"] in ("none", "method0")]
    for budget, last in ((64, 4), (192, 100)):
        rows.append({"split": "val", "configuration": f"pdrop@{budget}", "method": "pdrop", "num_tokens": budget,
                     "retained_tokens": last, "ciou": 0.5, "ciou_low": 0.45, "ciou_high": 0.55, "giou": 0.5,
                     "giou_low": 0.45, "giou_high": 0.55})  # fmt: skip
    figure = compare_tool.draw(rows)
    try:
        axis = figure.axes[0]
        lines = {container.get_label(): container.lines[0] for container in axis.containers}
        dodge = compare_tool.dodge_factors(["method0", "pdrop"])
        assert np.allclose(lines["pdrop"].get_xdata(), [64 * dodge["pdrop"], 192 * dodge["pdrop"]])
        assert [tick.get_text() for tick in axis.get_xticklabels()] == ["64", "192"]
        assert axis.get_xlabel() == "visual-token budget (points dodged per method)"
    finally:
        plt.close(figure)
    for row in rows:
        row["num_masks"] = 4
    markdown = compare_tool.to_markdown(rows)
    assert "| split | configuration | budget | tokens | masks |" in markdown
    assert "| val | pdrop@64 | 64 | 4 | 4 | 50.00 [45.00, 55.00] |" in markdown
    assert "| val | none | - | 576 | 4 |" in markdown
