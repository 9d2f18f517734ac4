"""The scoring job's library parts: the folder scan, output files (torn, corrupt, escaped), resume by location."""

import csv
import json
import os

import pytest

from resmemnet.inference import Prediction
from resmemnet.jobs import RowWriter, ScoringJob, path_key, read_rows, scan_images, write_rows
from tests.conftest import make_photo

ROWS = [Prediction("/p/a.jpg", 0.25), Prediction("/p/b}{\",\n.jpg", 0.5), Prediction("/p/c.jpg", None, "bad: junk")]


def test_scan_dedupes_one_folder_named_two_ways(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        make_photo(folder / f"{i}.jpg", size=(8, 8))
    monkeypatch.chdir(tmp_path)
    scan = scan_images(["photos", str(folder), "photos/0.jpg", "./photos/../photos/1.jpg"])
    assert scan.paths == [f"photos/{i}.jpg" for i in range(4)] and scan.warnings == []


def test_scan_gives_every_image_looking_entry_a_row_or_a_warning(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    make_photo(folder / "real.jpg", size=(8, 8))
    make_photo(folder / "jpeg_inside.heic", size=(8, 8), fmt="JPEG")
    (folder / "fake.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(20))
    (folder / "x.jpg").mkdir()
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "notes.txt").write_text("not an image name")
    scan = scan_images([folder])
    names = sorted(os.path.basename(p) for p in scan.paths)
    assert names == ["dangling.jpg", "fake.heic", "jpeg_inside.heic", "loop.jpg", "real.jpg"]
    assert len(scan.warnings) == 1 and "x.jpg" in scan.warnings[0] and "a folder, not an image" in scan.warnings[0]

    empty = tmp_path / "empty.jpg"
    empty.mkdir()  # a folder named like an image, named directly: a warning, and the other sources still count
    scan = scan_images([empty, folder / "real.jpg", str(tmp_path / "nothing*.png")])
    assert scan.paths == [str(folder / "real.jpg")]
    assert any("no images" in w and "empty.jpg" in w for w in scan.warnings)
    assert any("no files match" in w for w in scan.warnings)
    with pytest.raises(FileNotFoundError, match="nothing to score: no images .* in .*empty.jpg"):
        scan_images([empty])


def test_recursive_scan_follows_a_link_loop_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    make_photo(tmp_path / "a" / "b" / "deep.png", size=(8, 8))
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")
    assert [os.path.basename(p) for p in scan_images([tmp_path], recursive=True).paths] == ["deep.png"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_rows_round_trip_with_awkward_paths(tmp_path, fmt):
    rows = [*ROWS, Prediction("=HYPERLINK(\"http://x\").jpg", 0.75), Prediction("+1+1.jpg", 0.125),
            Prediction("'quoted.jpg", 0.5), Prediction("-x.jpg", None, "=not a formula")]
    write_rows(tmp_path / f"o.{fmt}", rows)
    assert read_rows(tmp_path / f"o.{fmt}") == rows


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    names = ["=HYPERLINK(\"http://x\").jpg", "+1+1.jpg", "-2.jpg", "@SUM(A1).jpg", "\tx.jpg", "\rx.jpg", "ok.jpg"]
    write_rows(tmp_path / "o.csv", [Prediction(n, 0.5) for n in names])
    with open(tmp_path / "o.csv", newline="") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert cells == ["'" + n for n in names[:-1]] + ["ok.jpg"]


def test_score_std_is_a_column_only_when_given(tmp_path):
    write_rows(tmp_path / "plain.csv", ROWS)
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == "path,score,error"
    spread = [Prediction("a.jpg", 0.5, "", 0.125), Prediction("b.jpg", None, "bad")]
    write_rows(tmp_path / "s.csv", spread, fields=("path", "score", "error", "score_std"))
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "path,score,error,score_std"
    assert read_rows(tmp_path / "s.csv") == spread


def test_a_csv_torn_inside_a_quoted_multiline_path_gives_no_phantom_row(tmp_path):
    out = tmp_path / "o.csv"
    write_rows(out, ROWS[:1])
    text = out.read_text()
    with open(out, "a", newline="") as f:
        RowWriter(f, "csv", append=True).write([Prediction("/p/two\nlines.jpg", 0.5)])
    whole = out.read_text()
    for cut in range(len(text), len(whole)):
        out.write_text(whole[:cut], newline="")
        assert read_rows(out) == ROWS[:1], repr(whole[:cut])


def test_a_json_array_torn_anywhere_keeps_its_complete_rows(tmp_path):
    out = tmp_path / "o.json"
    write_rows(out, ROWS)
    whole = out.read_text()
    complete = [whole.index(json.dumps({"path": r.path, "score": r.score, "error": r.error})) for r in ROWS]
    for cut in range(1, len(whole)):
        out.write_text(whole[:cut])
        expected = sum(1 for start, r in zip(complete, ROWS, strict=True)
                       if cut >= start + len(json.dumps({"path": r.path, "score": r.score, "error": r.error})))
        assert len(read_rows(out)) == expected, repr(whole[:cut])


def test_a_corrupt_middle_line_is_an_error_naming_file_and_line_a_torn_last_line_is_not(tmp_path):
    out = tmp_path / "o.jsonl"
    write_rows(out, ROWS)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "{oops\n" + lines[2])
    with pytest.raises(ValueError, match=r"o\.jsonl, line 2: not a JSON row"):
        read_rows(out)
    out.write_text(lines[0] + lines[1] + lines[2][:10])
    assert read_rows(out) == ROWS[:2]
    out.write_text(lines[0] + json.dumps({"path": "x.jpg", "score": "", "error": ""}) + "\n")
    with pytest.raises(ValueError, match="line 2: a row with neither a score nor an error"):
        read_rows(out)
    bad = tmp_path / "o.json"
    write_rows(bad, ROWS)
    text = bad.read_text().splitlines(keepends=True)
    bad.write_text("".join([text[0], text[1][:8] + "\n", *text[2:]]))
    with pytest.raises(ValueError, match=r"o\.json, line 2: not a JSON row"):
        read_rows(bad)
    other = tmp_path / "other.csv"
    other.write_text("name,value\na,1\n")
    with pytest.raises(ValueError, match="is not a predict output"):
        read_rows(other)


def test_job_arguments_are_checked_before_any_work(tmp_path):
    (tmp_path / "done.csv").write_text("path,score,error\n")
    cases = [(ScoringJob(["x"], batch_size=0), "--batch-size must be positive"),
             (ScoringJob(["x"], resume=True), "--resume needs --output"),
             (ScoringJob(["x"], output=str(tmp_path / "o.txt")), "use one of: .csv, .jsonl, .json"),
             (ScoringJob(["x"], output=str(tmp_path / "done.csv")),
              "already exists; pass --resume to continue it, --overwrite to replace it, or choose another --output"),
             (ScoringJob(["x"], output=str(tmp_path / "done.csv"), resume=True, overwrite=True),
              "pass one of them")]
    for job, message in cases:
        with pytest.raises(ValueError, match=message):
            job.check()
    ScoringJob(["x"], output=str(tmp_path / "done.csv"), resume=True).check()
    ScoringJob(["x"], output=str(tmp_path / "done.csv"), overwrite=True).check()


def test_path_key_resolves_folders_but_not_a_linked_file(tmp_path, monkeypatch):
    (tmp_path / "real.jpg").write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    monkeypatch.chdir(tmp_path)
    assert path_key("real.jpg") == path_key(tmp_path / "real.jpg") == path_key(f"../{tmp_path.name}/real.jpg")
    assert path_key("link.jpg") != path_key("real.jpg")


def test_scan_files_folders_globs_in_a_stable_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert scan_images([tmp_path]).paths == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg")]
    assert scan_images([tmp_path], recursive=True).paths[-1] == str(tmp_path / "sub" / "c.webp")
    assert scan_images([str(tmp_path / "**" / "*.webp"), tmp_path / "b.jpg", tmp_path / "b.jpg"],
                       recursive=True).paths == [str(tmp_path / "sub" / "c.webp"), str(tmp_path / "b.jpg")]
    assert scan_images([tmp_path / "missing.jpg"]).paths == [str(tmp_path / "missing.jpg")]  # an error row later


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_name_that_is_not_utf8_is_written_losslessly_and_read_back(tmp_path, fmt):
    """Issue 21.1: any byte string the file system holds is a path in every format (os.fsdecode's surrogates)."""
    odd = os.fsdecode(b"/p/b\xff\xfe.jpg")
    rows = [Prediction(odd, 0.5), Prediction(os.fsdecode(b"=c\xe9.jpg"), None, "bad"), *ROWS]
    write_rows(tmp_path / f"o.{fmt}", rows)
    assert read_rows(tmp_path / f"o.{fmt}") == rows
    if fmt == "csv":  # the file system's own bytes, so a spreadsheet shows the name as the file manager does
        assert b"/p/b\xff\xfe.jpg" in (tmp_path / "o.csv").read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_stored_nan_score_reads_back_as_an_error_row_never_a_number(tmp_path, fmt):
    """Issue 21.3: an older run's NaN is no score: resume keeps the row as a failure and rewrites no NaN."""
    out = tmp_path / f"o.{fmt}"
    if fmt == "csv":
        out.write_text("path,score,error\na.jpg,nan,\nb.jpg,0.5,\nc.jpg,inf,\n")
    else:
        lines = [json.dumps(r) for r in ({"path": "a.jpg", "score": float("nan"), "error": ""},
                                         {"path": "b.jpg", "score": 0.5, "error": ""},
                                         {"path": "c.jpg", "score": float("inf"), "error": ""})]
        out.write_text("\n".join(lines) + "\n" if fmt == "jsonl" else "[" + ",\n".join(lines) + "]\n")
    assert read_rows(out) == [Prediction("a.jpg", None, "model produced NaN"), Prediction("b.jpg", 0.5),
                              Prediction("c.jpg", None, "model produced an infinite score")]
