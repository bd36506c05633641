"""The --help shape every padim command shares: a paragraph, each flag's default, one example."""

from __future__ import annotations

import pytest

from padim_core.command_line import command_parser


def test_help_shows_the_description_every_default_and_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    parser = command_parser("padim-x", "Does x to every category. " * 10, "padim-x --size 64 data/")
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--config", help="experiment YAML")
    parser.add_argument("--dry-run", action="store_true", help="only check")
    parser.add_argument("--set", action="append", default=[], help="overrides")
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Does x to every category.") and max(map(len, description.splitlines())) <= 100
    flowing = " ".join(text.split())
    assert "image side (default: 256)" in flowing
    assert flowing.count("(default: auto)") == 1  # a help that names its default is not told twice
    for flag in ("experiment YAML", "only check", "overrides"):  # no default worth showing: None, False, []
        assert f"{flag} (default" not in flowing
    assert text.endswith("example:\n  padim-x --size 64 data/\n")
