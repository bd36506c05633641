"""Which category names are safe: they become folder names, MLflow metric keys and registered
model names, and they come from data (folder names, archive members, Parquet columns).

One rule everywhere: letters, digits, `_`, `-` and `.`, starting with a letter or digit, at most
100 characters. So no name is `.` or `..`, holds a path separator or a space, or is refused by
MLflow. Names from data that break it are never used as given: jobs.score gives such images an
error row; jobs.fit refuses the category before any work.
"""

from __future__ import annotations

import re

RULE = "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 100 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


def category_problem(name: str) -> str | None:
    """Why `name` cannot be a category, or None when it can."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return None
    return f"{name!r} is not a usable category name (allowed: {RULE})"
