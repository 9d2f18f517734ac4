"""Score tables refuse bad rows: a non-number, NaN, inf or an image listed twice stops with file and line."""

import pytest

from resmemnet.cli import main
from resmemnet.data import ScoreFileError, load_split
from resmemnet.data.base import ImageScoreDataset
from tests.conftest import make_photo

BAD_SCORES = {"NaN": "nan", "inf": "inf", "-inf": "-inf", "non-number": "high"}
PROBLEMS = {"NaN": "'nan', not a finite number", "inf": "'inf', not a finite number",
            "-inf": "'-inf', not a finite number", "non-number": "is not a number: 'high'"}


@pytest.fixture
def photos(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_photo(tmp_path / name, size=(8, 8))
    return tmp_path


def _error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message  # one line, as the CLI prints it
    return message


@pytest.mark.parametrize("case", BAD_SCORES)
def test_csv_bad_score_names_file_and_line(photos, case):
    table = photos / "scores.csv"
    table.write_text(f"path,score\na.jpg,0.5\nb.jpg,{BAD_SCORES[case]}\nc.jpg,0.7\n")
    with pytest.raises(ScoreFileError) as excinfo:
        load_split("csv", photos, csv=table)
    assert _error(excinfo).startswith(f"{table}:3: score ") and PROBLEMS[case] in str(excinfo.value)
    assert (excinfo.value.path, excinfo.value.line) == (table, 3)


@pytest.mark.parametrize("again", ["a.jpg", "./a.jpg", "sub/../a.jpg", "{root}/a.jpg"])
def test_csv_image_listed_twice_names_both_lines(photos, again):
    table = photos / "scores.csv"
    table.write_text(f"path,score\na.jpg,0.5\nb.jpg,0.6\n{again.format(root=photos)},0.9\nc.jpg,0.7\n")
    with pytest.raises(ScoreFileError, match=r"is listed again \(first on line 2\)") as excinfo:
        load_split("csv", photos, csv=table)
    assert _error(excinfo).startswith(f"{table}:4: ")


def test_csv_empty_path_is_an_error(photos):
    table = photos / "scores.csv"
    table.write_text("path,score\na.jpg,0.5\n,0.6\n")
    with pytest.raises(ScoreFileError, match=r"scores.csv:3: path is empty"):
        load_split("csv", photos, csv=table)


MEMCAT_HEADER = "image_file,category,subcategory,memorability_w_fa_correction,memorability_wo_fa_correction"


@pytest.mark.parametrize("case", BAD_SCORES)
def test_memcat_bad_score_names_file_and_line(tmp_path, case):
    table = tmp_path / "memcat_image_data.csv"
    table.write_text(f"{MEMCAT_HEADER}\na.jpg,animal,dog,0.5,0.6\nb.jpg,food,fruit,{BAD_SCORES[case]},0.6\n")
    with pytest.raises(ScoreFileError) as excinfo:
        load_split("memcat", tmp_path)
    assert _error(excinfo).startswith(f"{table}:3: memorability_w_fa_correction ")
    assert PROBLEMS[case] in str(excinfo.value)


def test_memcat_image_listed_twice(tmp_path):
    table = tmp_path / "memcat_image_data.csv"
    table.write_text(f"{MEMCAT_HEADER}\na.jpg,animal,dog,0.5,0.6\na.jpg,food,fruit,0.5,0.6\n"
                     "a.jpg,animal,dog,0.4,0.5\n")  # the same file name in another folder is another image
    with pytest.raises(ScoreFileError, match=r"memcat_image_data.csv:4: .*a.jpg is listed again \(first on line 2\)"):
        load_split("memcat", tmp_path)


def test_memcat_row_without_its_folders_is_an_error(tmp_path):
    (tmp_path / "memcat_image_data.csv").write_text(f"{MEMCAT_HEADER}\na.jpg,animal,,0.5,0.6\n")
    with pytest.raises(ScoreFileError, match=r"memcat_image_data.csv:2: category, subcategory or image_file is empty"):
        load_split("memcat", tmp_path)


def _lamem(root, train_lines):
    (root / "splits").mkdir()
    (root / "images").mkdir()
    (root / "splits" / "train_1.txt").write_text("".join(f"{line}\n" for line in train_lines))
    (root / "splits" / "test_1.txt").write_text("c.jpg 0.5\n")
    return root / "splits" / "train_1.txt"


@pytest.mark.parametrize("case", BAD_SCORES)
def test_lamem_bad_score_names_file_and_line(tmp_path, case):
    split_file = _lamem(tmp_path, ["a.jpg 0.5", "", f"b.jpg {BAD_SCORES[case]}"])
    with pytest.raises(ScoreFileError) as excinfo:
        load_split("lamem", tmp_path)
    assert _error(excinfo).startswith(f"{split_file}:3: score ") and PROBLEMS[case] in str(excinfo.value)


def test_lamem_image_listed_twice(tmp_path):
    split_file = _lamem(tmp_path, ["a.jpg 0.5", "b.jpg 0.6", "a.jpg 0.7"])
    with pytest.raises(ScoreFileError, match=r"train_1.txt:3: .*a.jpg is listed again \(first on line 1\)"):
        load_split("lamem", tmp_path)
    assert split_file.is_file()


def test_lamem_image_in_two_parts_of_a_split_names_the_second(tmp_path):
    _lamem(tmp_path, ["a.jpg 0.5", "b.jpg 0.6"])
    (tmp_path / "splits" / "test_1.txt").write_text("c.jpg 0.5\n\nb.jpg 0.6\n")
    with pytest.raises(ScoreFileError, match=r"test_1.txt:3: b.jpg is also in train_1.txt; an image belongs to one "
                                             r"part of a split"):
        load_split("lamem", tmp_path)


def test_cli_prints_the_bad_row_as_one_line_and_exits_2(photos, capsys):
    table = photos / "scores.csv"
    table.write_text("path,score\na.jpg,0.5\nb.jpg,inf\n")
    assert main(["dataset", "--dataset", "csv", "--root", str(photos), "--csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert err == f"resmemnet dataset: error: {table}:3: score is 'inf', not a finite number; give the image a " \
                  "real score or remove its row\n"


def test_a_dataset_cannot_hold_a_non_finite_score(tmp_path):
    with pytest.raises(ValueError, match=r"1 of 2 scores are not finite, e.g. .*b.jpg: nan"):
        ImageScoreDataset([tmp_path / "a.jpg", tmp_path / "b.jpg"], [0.5, float("nan")])
    with pytest.raises(ValueError, match="not finite"):
        ImageScoreDataset([tmp_path / "a.jpg"], [1e300])  # inf once stored as float32
