"""The LaMem loader against the real split files, with stand-in images for a few names."""

import numpy as np
import pytest

from resmemnet.data import describe_dataset, load_split, num_splits
from resmemnet.data.images import load_image
from resmemnet.data.lamem import read_split_file
from tests.conftest import make_photo, shared_dataset


@pytest.fixture
def lamem_root(tmp_path):
    """A tmp root whose splits/ is the real split folder (a symlink) and images/ a few stand-ins."""
    (tmp_path / "splits").symlink_to(shared_dataset("lamem") / "splits")
    (tmp_path / "images").mkdir()
    return tmp_path


def test_all_five_real_splits_have_the_official_sizes(lamem_root):
    assert num_splits("lamem", lamem_root) == 5
    info = describe_dataset("lamem", lamem_root)
    assert info["splits"]["sizes"] == [{"split": s, "train": 45_000, "val": 3_741, "test": 10_000} for s in range(5)]
    assert info["images"] == {**info["images"], "listed": 58_741, "present": 0, "absent": 58_741}
    assert 0 < info["scores"]["min"] < info["scores"]["mean"] < info["scores"]["max"] <= 1


@pytest.mark.parametrize("split", range(5))
def test_each_real_split_loads_present_images_with_their_own_scores(lamem_root, split):
    names, scores = {}, {}
    for part in ("train", "val", "test"):
        names[part], scores[part] = read_split_file(lamem_root / "splits" / f"{part}_{split + 1}.txt")
    assert [len(names[p]) for p in ("train", "val", "test")] == [45_000, 3_741, 10_000]
    # stand-ins for the 3rd and 10th train names, the 2nd test name and, on odd splits, the last val name
    for name in (names["train"][2], names["train"][9], names["test"][1], *(names["val"][-1:] if split % 2 else [])):
        make_photo(lamem_root / "images" / name, size=(8, 8))
    loaded = load_split("lamem", lamem_root, split=split)
    assert [p.name for p in loaded.train.paths] == [names["train"][2], names["train"][9]]
    np.testing.assert_allclose(loaded.train.scores, scores["train"][[2, 9]], rtol=1e-6)
    assert [p.name for p in loaded.test.paths] == [names["test"][1]]
    assert loaded.test.scores[0] == pytest.approx(scores["test"][1])
    if split % 2:
        assert [p.name for p in loaded.val.paths] == [names["val"][-1]]
        assert loaded.val.scores[0] == pytest.approx(scores["val"][-1])
    else:
        assert loaded.val is None  # none of the val images is on disk
    assert loaded.info["absent"] == {"train": 44_998, "val": 3_741 - split % 2, "test": 9_999}
    assert loaded.info["unscored"] == {"train": 0, "val": 0, "test": 0}
    assert loaded.test_other_half is None  # one score per image: no split halves
    assert loaded.info["split_files"] == [f"{p}_{split + 1}.txt" for p in ("train", "val", "test")]
    assert load_image(loaded.train.paths[1]).size == (8, 8)
    assert float(loaded.train.scores[1]) == pytest.approx(scores["train"][9])


def test_no_images_at_all_is_a_clear_error(lamem_root):
    with pytest.raises(FileNotFoundError, match="download LaMem's images"):
        load_split("lamem", lamem_root)


def test_malformed_split_line_names_file_and_line(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train_1.txt").write_text("a.jpg 0.5\nb.jpg\n")
    (tmp_path / "splits" / "test_1.txt").write_text("c.jpg 0.5\n")
    with pytest.raises(ValueError, match=r"train_1.txt:2: expected 'NAME SCORE'"):
        load_split("lamem", tmp_path)
