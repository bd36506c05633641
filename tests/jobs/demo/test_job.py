"""jobs.demo: packing the test images, and the steps it runs (each job in its own process),
here with the jobs themselves replaced by stand-ins: tests/jobs/fit and tests/jobs/score run them."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from jobs.demo import job as demo
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset

from support.paths import DEMO_CONFIG


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", train=2, test_good=1, test_defect=1, size=32)


def test_pack_test_images_archives_every_categorys_test_split(data_root: Path, tmp_path: Path) -> None:
    archive = tmp_path / "out" / "demo_test_images.tar"
    count = demo.pack_test_images(data_root, archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    expected = sorted(sample.path.relative_to(data_root).as_posix() for name in ("brick", "grass", "gravel")
                      for sample in MvtecCategory.from_folder(data_root / name).test_samples)
    assert count == len(names) == 3 * 5 and sorted(names) == expected
    assert all(name.split("/")[1] == "test" for name in names)  # the first folder level is the category
    assert [path.name for path in archive.parent.iterdir()] == ["demo_test_images.tar"]


class Steps:
    """Stands in for subprocess.run: records each command, answers with the next exit status."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        self.commands.append(command)
        return subprocess.CompletedProcess(command, self.statuses.pop(0))


def test_the_demo_fits_packs_and_scores(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    steps = Steps(0, 0)
    monkeypatch.setattr(demo.subprocess, "run", steps)
    output = tmp_path / "out"
    assert demo.main(["--config", str(DEMO_CONFIG), "--data-root", str(data_root), "--output", str(output)]) == 0
    fit, score = steps.commands
    assert fit[1:3] == ["-m", "jobs.fit"] and fit[fit.index("--data-root") + 1] == str(data_root)
    assert fit[fit.index("--output") + 1] == str(output) and fit[fit.index("--config") + 1] == str(DEMO_CONFIG)
    assert score[1:3] == ["-m", "jobs.score"] and score[score.index("--input") + 1] == str(output / "demo_test_images.tar")
    assert score[score.index("--models") + 1] == str(output / "models") and "overwrite" in score
    printed = capsys.readouterr().out
    assert f"reusing {data_root}" in printed and "packed 15 test images" in printed and "\nDone.\n" in printed
    assert f"drift alarm:  {output / 'scores.drift.json'}" in printed and f"splits:       {output / 'manifests'}" in printed
    assert (output / "demo_test_images.tar").is_file()


def test_a_failed_step_stops_the_demo_with_exit_1(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    steps = Steps(3)
    monkeypatch.setattr(demo.subprocess, "run", steps)
    assert demo.main(["--config", str(DEMO_CONFIG), "--data-root", str(data_root), "--output", str(tmp_path / "out")]) == 1
    assert len(steps.commands) == 1  # nothing is scored after a failed fit
    assert "padim-demo: failed: fit failed (exit 3)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "demo_test_images.tar").exists()


def test_a_bad_config_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    steps = Steps()
    monkeypatch.setattr(demo.subprocess, "run", steps)
    assert demo.main(["--config", str(tmp_path / "absent.yaml"), "--output", str(tmp_path / "out")]) == 2
    assert steps.commands == [] and "(nothing was started)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
