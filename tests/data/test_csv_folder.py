"""Users' own data: a folder plus a CSV of path and score."""

import numpy as np
import pytest

from resmemnet.data import describe_dataset, load_split
from tests.conftest import make_photo


@pytest.fixture
def user_data(tmp_path):
    for i in range(10):
        make_photo(tmp_path / f"p{i}.jpg", size=(8, 8), seed=i)
    make_photo(tmp_path.parent / "outside.png", size=(8, 8))
    lines = ["path,score,other"] + [f"p{i}.jpg,{i / 10},x" for i in range(10)]
    lines += ["gone.jpg,0.9,x", f"{tmp_path.parent / 'outside.png'},0.95,x"]  # one absent, one absolute path
    (tmp_path / "scores.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_csv_split_keeps_scores_with_their_paths(user_data):
    split = load_split("csv", user_data, csv=user_data / "scores.csv", test_fraction=0.25, seed=5)
    pairs = {p.name: float(s) for d in (split.train, split.test) for p, s in zip(d.paths, d.scores, strict=True)}
    assert pairs == pytest.approx({**{f"p{i}.jpg": i / 10 for i in range(10)}, "outside.png": 0.95})
    assert split.info["absent"]["train"] + split.info["absent"]["test"] == 1
    assert len(split.info["image_split"]["test_indices"]) == 3  # round(12 * 0.25)
    everything = load_split("csv", user_data, csv=user_data / "scores.csv", test_fraction=1.0)
    assert len(everything.train) == 0 and len(everything.test) == 11
    info = describe_dataset("csv", user_data, csv=user_data / "scores.csv")
    assert (info["images"]["present"], info["images"]["absent"]) == (11, 1)
    assert info["scores"]["n"] == 12 and info["scores"]["max"] == pytest.approx(0.95)
    assert np.isclose(info["scores_present"]["mean"], (sum(i / 10 for i in range(10)) + 0.95) / 11)


def test_other_column_names_and_errors(user_data):
    (user_data / "named.csv").write_text("file;x\n")
    (user_data / "alt.csv").write_text("file,mem\np1.jpg,0.3\np2.jpg,oops\n")
    with pytest.raises(ValueError, match="needs the table's path"):
        load_split("csv", user_data)
    with pytest.raises(ValueError, match="lacks column.*path, score"):
        load_split("csv", user_data, csv=user_data / "named.csv")
    with pytest.raises(ValueError, match=r"alt.csv:3: mem is not a number: 'oops'"):
        load_split("csv", user_data, csv=user_data / "alt.csv", path_column="file", score_column="mem")
    with pytest.raises(FileNotFoundError, match="CSV file .*nope.csv not found"):
        load_split("csv", user_data, csv=user_data / "nope.csv")
