"""jobs.score.reading: the rows of one input unit, each routed to its category's model."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.score.reading import CategoryRouter, read_rows
from jobs.score.sources import discover
from jobs.score.table import UNKNOWN_CATEGORY

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # bytes only: reading never decodes


def test_routing_order_fixed_then_routes_then_column_then_folder() -> None:
    router = CategoryRouter(("bottle", "cable"), routes=(("*/line3/*", "cable"),))
    assert router.route("/d/bottle/a.png", "bottle/a.png", None) == ("bottle", None)
    assert router.route("/d/line3/a.png", "line3/a.png", None) == ("cable", None)
    assert router.route("x.parquet::#1", "#1", "cable") == ("cable", None)
    category, error = router.route("/d/a.png", "a.png", None)
    assert category == UNKNOWN_CATEGORY and "--category" in error and "--route" in error
    category, error = router.route("/d/screw/a.png", "screw/a.png", None)
    assert category == "screw" and "no model for category 'screw' (models: bottle, cable)" in error
    assert CategoryRouter(("bottle",), fixed="bottle").route("/d/screw/a.png", "screw/a.png", "cable") == ("bottle", None)


def test_rows_carry_their_category_and_lose_their_bytes_when_no_model_takes_them(tmp_path: Path) -> None:
    for name in ("bottle/a.png", "screw/b.png", "bottle/notes.txt.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(PNG)
    discovery = discover([str(tmp_path)])
    router = CategoryRouter(("bottle",))
    rows = [row for unit in discovery.units for row in read_rows(unit, discovery.inputs, router)]
    by_source = {Path(row["source"]).relative_to(tmp_path).as_posix(): row for row in rows}
    assert sorted(by_source) == ["bottle/a.png", "bottle/notes.txt.png", "screw/b.png"]
    assert by_source["bottle/a.png"] == {"source": str(tmp_path / "bottle/a.png"), "category": "bottle", "input": 0,
                                         "data": PNG, "error": None, "skipped": False}
    screw = by_source["screw/b.png"]
    assert screw["category"] == "screw" and screw["data"] is None and "no model for category 'screw'" in screw["error"]


@pytest.mark.parametrize("name", ["..", "my images", ".hidden", "a/b", "ü" * 3, "x" * 101])
def test_category_names_from_data_that_break_the_rule_are_error_rows(name: str) -> None:
    router = CategoryRouter(("bottle",))
    category, error = router.route(f"in/{name}/a.png", f"{name}/a.png", hint=None)
    if "/" in name:  # the first folder level is "a"
        assert category == "a" and "no model" in error
        return
    assert category == UNKNOWN_CATEGORY and "is not a usable category name" in error and "letters, digits" in error
