"""jobs.shift.report: which shifts break a category first, in words, tables and metric names."""

from __future__ import annotations

from jobs.shift import report as shift_report


def test_report_ranks_the_shifts_that_break_first() -> None:
    def row(name: str, severity: int, image: float, pixel: float, fpr: float = 0.0, fnr: float = 0.0) -> dict:
        return {"shift": name, "severity": severity, "level": None if severity == 0 else float(severity),
                "image_auroc": image, "pixel_auroc": pixel, "false_positive_rate": fpr, "false_negative_rate": fnr}

    rows = [
        row("blur", 0, 1.0, 0.98), row("blur", 1, 0.99, 0.97), row("blur", 2, 0.80, 0.90),
        row("noise", 0, 1.0, 0.98), row("noise", 1, 0.90, 0.97), row("noise", 2, 0.70, 0.90),
        row("brightness", 0, 1.0, 0.98), row("brightness", 1, 1.0, 0.98, fpr=0.5), row("brightness", 2, 0.99, 0.98, fpr=1.0),
        row("jpeg", 0, 1.0, 0.98), row("jpeg", 1, 1.0, 0.91), row("jpeg", 2, 1.0, 0.90),
    ]
    found = shift_report.verdicts(rows, tolerance=0.05)
    assert [(v.shift, v.ranking_breaks_at, v.threshold_breaks_at) for v in found] == [
        ("noise", 1, None), ("jpeg", 1, None), ("blur", 2, None), ("brightness", None, 1),
    ]
    sentence = shift_report.summary_sentence(rows, tolerance=0.05)
    assert sentence.startswith("Breaks first under **noise at severity 1 (level 1: image AUROC 0.900, pixel AUROC 0.970)**")
    assert "Holds within 0.05 AUROC at every level tried under brightness." in sentence
    assert "threshold fails first under brightness at severity 1 (false-positive rate 0.500" in sentence
    table = shift_report.figures_table(rows).splitlines()
    assert table[2].startswith("| (none) | 0 | - | 1.000 | 0.980 |") and len(table) == 2 + 1 + 8
    assert shift_report.flat_metrics(rows[:2])["shift/blur/1/pixel_auroc"] == 0.97


def test_the_report_has_a_section_per_category_and_detector() -> None:
    rows = [{"shift": "blur", "severity": severity, "level": level, "image_auroc": auroc, "pixel_auroc": 0.9,
             "false_positive_rate": 0.1, "false_negative_rate": 0.0} for severity, level, auroc in ((0, None, 1.0), (1, 2.0, 0.8))]
    results = [
        {"category": "brick", "detector": "padim", "status": "ok", "error": None, "figures": rows, "n_test": 12,
         "model_uri": "models:/padim-brick/1", "threshold": 1.5},
        {"category": "gravel", "detector": "padim", "status": "failed", "error": "ModelError: no model", "figures": []},
    ]
    text = shift_report.report_markdown(results, {"blur": (2.0,)}, 3, 0.05, {"brick/padim": "brick-padim.png"}, "registry")
    assert text.startswith("# Domain shift report\n") and "Models: registry. Seed 3;" in text
    assert "| blur | 2 | " in text
    brick = text.split("## brick (padim)\n", 1)[1].split("## gravel (padim)", 1)[0]
    assert "12 test images; model models:/padim-brick/1. Unshifted: image AUROC 1.000" in brick
    assert "![brick/padim: figures against severity](brick-padim.png)" in brick
    assert "Breaks first under **blur at severity 1" in brick and "| blur | 1 | 2 | 0.800 |" in brick
    assert text.rstrip().endswith("## gravel (padim)\n\nNot evaluated: ModelError: no model")
