"""evaluation/compare.py: metric tables side by side, paper entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
compare = load_script("evaluation/compare.py")


def test_compare_prints_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = {"splits": {"refcoco:val": {"final": {"oIoU": 76.36, "mIoU": 78.10}}}}
    b = {
        "splits": {
            "refcoco:val": {"final": {"oIoU": 70.00, "mIoU": 80.00, "P@0.5": 90.0}},
            "refcoco:testA": {"final": {"mIoU": 1.0}},
        }
    }
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    text = compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "| refcoco:val | final | oIoU | 76.36 | 70.00 | -6.36 |" in text
    assert "| refcoco:val | final | mIoU | 78.10 | 80.00 | +1.90 |" in text
    assert "P@0.5 |" not in text  # only in B
    assert "only in b.json: refcoco:testA/final" in text
    assert text in capsys.readouterr().out


def test_paper_results_entries_compare() -> None:
    paper = ROOT / "evaluation" / "paper_results.json"
    text = compare.main(
        [
            str(paper),
            str(paper),
            "--a-entry",
            "table5/point+text",
            "--b-entry",
            "table5/mask+point+text",
        ]
    )
    assert "| refcoco:val | final | mIoU | 76.75 | 78.10 | +1.35 |" in text  # Sec. 4.4 text
    with pytest.raises(SystemExit, match="no entry"):
        compare.main([str(paper), str(paper), "--a-entry", "table9"])
