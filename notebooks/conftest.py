"""nbval settings for the notebooks: rich outputs (plotly figures, widgets) are never compared.

Run with the README's test command (pyproject's addopts add ``--nbval-lax`` and the sanitize
file): every cell must execute without error, and only cells marked ``# NBVAL_CHECK_OUTPUT``
(rounded, CPU-deterministic scalars) are compared with the stored outputs.

A plotly figure or a widget is dropped from both sides of a comparison as a whole output, not
only by mime type (nbval's ``skip_compare``): a widget's ``text/plain`` repr and plotly's HTML
initialisation snippet would otherwise still be compared.
"""

from __future__ import annotations

from typing import Any

import pytest

RICH_MIMES = frozenset({
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
})


def is_rich(output: Any) -> bool:
    """A plotly figure, a widget, or plotly's one-time notebook initialisation HTML."""
    data = output.get("data", {})
    return bool(RICH_MIMES & set(data)) or "window.PlotlyConfig" in data.get("text/html", "")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: no notebook items to adjust
        return
    for item in items:
        if isinstance(item, IPyNbCell):
            compare = item.compare_outputs

            def compare_plain(test, ref, skip_compare=None, _compare=compare):
                return _compare([o for o in test if not is_rich(o)], [o for o in ref if not is_rich(o)], skip_compare)

            item.compare_outputs = compare_plain
