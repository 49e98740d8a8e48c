"""The coverage figure is readable: no legend covers data, no x label or legend runs into the title of the
panel below, and the horizontal coverage targets are named.

    pytest -q tests/test_plots.py
"""
import numpy as np
import pytest

from validation.coverage.metrics import SEED_KS
from validation.plots import coverage_figure, draw_coverage

E, K, L = 60, 4, 8


def control_result() -> dict:
    """A router control: every per-layer bar at 1.0 (the case where an inside legend must cover a bar)."""
    res = {"top_k": K, "num_experts": E}
    for k in SEED_KS:
        res.update({f"recall@{k}": min(1.0, k / K), f"coverage@{k}": float(k >= K), f"any_hit@{k}": 1.0,
                    f"random/recall@{k}": k / E})
    return res


@pytest.fixture(scope="module")
def figure():
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.full(E, 50.0))
    ranks = np.zeros(E)
    ranks[:K] = 1 / K
    fig = draw_coverage(control_result(), list(SEED_KS), [1.0] * L, share, share, ranks, "control")
    fig.canvas.draw()
    yield fig
    import matplotlib.pyplot as plt

    plt.close(fig)


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_no_legend_covers_its_panel(figure):
    r = figure.canvas.get_renderer()
    with_legend = [a for a in figure.axes if a.get_legend() is not None]
    assert len(with_legend) == 3
    for a in with_legend:
        assert not overlaps(a.get_legend().get_window_extent(r), a.get_window_extent(r)), a.get_title()


def test_nothing_of_the_top_row_runs_into_the_titles_below(figure):
    r = figure.canvas.get_renderer()
    top, bottom = figure.axes[:2], figure.axes[2:]
    for a in top:
        for b in bottom:
            assert not overlaps(a.get_tightbbox(r), b.title.get_window_extent(r)), (a.get_title(), b.get_title())


def test_coverage_target_lines_are_named(figure):
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert any("90%" in t and "95%" in t for t in texts), texts


def test_coverage_figure_writes_a_png(tmp_path):
    out = tmp_path / "f.png"
    share = np.full(E, 1 / E)
    coverage_figure(control_result(), list(SEED_KS), [1.0] * L, share, share, share, "control", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
