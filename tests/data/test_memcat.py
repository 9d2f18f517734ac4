"""The MemCat loader on the real CSV, with stand-in images for a few rows."""

import csv

import numpy as np
import pytest

from resmemnet.data import describe_dataset, load_split, num_splits
from tests.conftest import make_photo, shared_dataset


def _rows():
    with open(shared_dataset("memcat") / "memcat_image_data.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_real_csv_is_read_by_header_name_with_either_score_column():
    root = shared_dataset("memcat")
    rows = _rows()
    corrected = describe_dataset("memcat", root)
    raw = describe_dataset("memcat", root, score_column="memorability_wo_fa_correction")
    assert corrected["images"]["listed"] == 10_000 and corrected["images"]["absent"] == 10_000
    assert corrected["categories"] == {c: 2000 for c in ("animal", "food", "landscape", "sports", "vehicle")}
    for info, column in ((corrected, "memorability_w_fa_correction"), (raw, "memorability_wo_fa_correction")):
        assert info["scores"]["mean"] == pytest.approx(np.mean([float(r[column]) for r in rows]))
    assert raw["scores"]["mean"] > corrected["scores"]["mean"]  # correction subtracts false alarms
    assert num_splits("memcat", root) == 1
    with pytest.raises(ValueError, match="choose one of: memorability_w_fa_correction, memorability_wo_fa"):
        describe_dataset("memcat", root, score_column="H")


@pytest.mark.parametrize("column", ["memorability_w_fa_correction", "memorability_wo_fa_correction"])
def test_split_reads_images_from_category_folders(tmp_path, column):
    rows = _rows()
    chosen = [rows[0], rows[2500], rows[9999]]
    for i, row in enumerate(chosen):
        folder = tmp_path / row["category"] / row["subcategory"]
        folder.mkdir(parents=True, exist_ok=True)
        make_photo(folder / row["image_file"], size=(8, 8), seed=i)
    csv_path = shared_dataset("memcat") / "memcat_image_data.csv"
    split = load_split("memcat", tmp_path, csv=csv_path, score_column=column, seed=3)
    loaded = {str(p.relative_to(tmp_path)): s
              for d in (split.train, split.test) for p, s in zip(d.paths, d.scores, strict=True)}
    expected = {f"{r['category']}/{r['subcategory']}/{r['image_file']}": float(r[column]) for r in chosen}
    assert loaded.keys() == expected.keys()
    for key, score in expected.items():
        assert loaded[key] == pytest.approx(score)
    assert split.info["absent"]["train"] + split.info["absent"]["test"] == 9_997
    assert split.info["score_column"] == column and split.info["image_split"]["seed"] == 3
    assert len(split.info["image_split"]["test_indices"]) == 2000


def test_missing_csv_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="memcat_image_data.csv"):
        load_split("memcat", tmp_path)
