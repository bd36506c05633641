"""The first stage of jobs.score: the rows of one input unit, each routed to its category.

Kept free of torch: Ray Data runs it in its own worker processes, which then start quickly
and stay small instead of importing torch for nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.common.categories import category_problem
from jobs.score.sources import Input, read_unit
from jobs.score.table import UNKNOWN_CATEGORY


@dataclass(frozen=True)
class CategoryRouter:
    """Which category (so which model) an image belongs to.

    In order: `fixed` (`--category`), the first `routes` pattern (`--route PATTERN=CATEGORY`,
    shell-style, matched against the image's `source`), a `category` column of a Parquet
    input, the first folder level under the input root or inside the archive.
    """

    known: tuple[str, ...]
    fixed: str | None = None
    routes: tuple[tuple[str, str], ...] = ()

    def route(self, source: str, relative: str | None, hint: str | None) -> tuple[str, str | None]:
        """(category, error): the error says why an image has no usable model."""
        category = self.fixed
        if category is None:
            category = next((name for pattern, name in self.routes if fnmatch.fnmatchcase(source, pattern)), None)
        if category is None:
            category = hint
        if category is None and relative and "/" in relative:
            category = relative.split("/", 1)[0]
        if category is None:
            return UNKNOWN_CATEGORY, (
                f"cannot tell the category of {source}: it is not inside a category folder; "
                "pass --category NAME or --route PATTERN=NAME"
            )
        problem = category_problem(category)
        if problem is not None:
            return UNKNOWN_CATEGORY, f"cannot score {source}: its category {problem}"
        if category not in self.known:
            return category, f"no model for category {category!r} (models: {', '.join(self.known)})"
        return category, None


def read_rows(unit: dict[str, Any], inputs: Sequence[Input], router: CategoryRouter) -> Iterator[dict[str, Any]]:
    """flat_map: the rows of one unit, with their category."""
    for record in read_unit(unit, inputs):
        category, problem = router.route(record.source, record.relative, record.category)
        yield {
            "source": record.source,
            "category": category,
            "input": unit["input"],
            "data": record.data if problem is None else None,
            "error": record.error or (None if record.skipped else problem),
            "skipped": record.skipped,
        }
