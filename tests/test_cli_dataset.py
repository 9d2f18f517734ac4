"""`resmemnet dataset`: the Must-show numbers on the real LNSIM folder, and clear errors."""

import json

from resmemnet.cli import main
from tests.conftest import shared_dataset


def test_lnsim_json_reports_present_absent_and_human_consistency(capsys):
    root = shared_dataset("lnsim")
    assert main(["dataset", "--dataset", "lnsim", "--root", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["images"]["present"], info["images"]["absent"]) == (2231, 401)
    assert info["splits"]["count"] == 25 and info["human_consistency"]["n"] == 25
    assert abs(info["human_consistency"]["mean"] - 0.78) < 0.005
    assert main(["dataset", "--dataset", "lnsim", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "2,231 present, 401 absent of 2,632 listed" in text and "human consistency: 0.779" in text
    assert "unscored (nobody saw it): 0 image-splits in half 1, 0 in half 2; 0 images never scored" in text


def test_csv_dataset_and_errors(tmp_path, capsys):
    (tmp_path / "s.csv").write_text("image,mem\na.jpg,0.5\nb.jpg,0.7\n")
    assert main(["dataset", "--dataset", "csv", "--root", str(tmp_path), "--csv", str(tmp_path / "s.csv"),
                 "--path-column", "image", "--score-column", "mem", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"]["absent"] == 2 and info["scores"]["mean"] == 0.6
    assert main(["dataset", "--dataset", "csv", "--root", str(tmp_path)]) == 2
    assert "needs the table's path" in capsys.readouterr().err
    assert main(["dataset", "--dataset", "lnsim", "--root", str(tmp_path), "--csv", "x.csv"]) == 2
    assert "does not take option(s) csv" in capsys.readouterr().err
