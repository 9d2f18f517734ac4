"""The report folder of `resmemnet evaluate --report DIR`: a Markdown summary, a scatter plot, galleries.

Plots and galleries show one split (the first evaluated); the summary covers every evaluated split.
Figures are drawn with matplotlib's object API (no pyplot), so no GUI backend or global state is involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resmemnet.data.images import ImageLoadError, load_image
from resmemnet.fileio import atomic_write

__all__ = ["GALLERY_SIZE", "markdown_table", "summary_lines", "write_report"]

GALLERY_SIZE = 12  # images per gallery
_THUMB = 256  # longest side of a gallery thumbnail, in pixels


def _pm(stat: dict[str, float] | None, digits: int = 3) -> str:
    return "n/a" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _scatter(split: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # here, so `resmemnet evaluate` without --report never loads matplotlib

    predicted = np.asarray([row["predicted"] for row in split["predictions"]])
    true = np.asarray([row["true"] for row in split["predictions"]])
    fig = Figure(figsize=(5.5, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(true, predicted, s=8, alpha=0.5, edgecolors="none")
    # keep the data's own limits, so a model whose scores span a narrow band still shows its spread
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    ax.axline((0.5, 0.5), slope=1, linestyle="--", color="grey", linewidth=1, label="predicted = true")
    ax.set(xlim=xlim, ylim=ylim)
    m = split["metrics"]
    human = split["human_consistency"]
    title = f"split {split['split']}: Spearman {m['spearman']:.3f}, Pearson {m['pearson']:.3f}, n={m['n']}"
    if human is not None:
        title += f"\nhuman consistency on these images: {human:.3f}"
    ax.set(xlabel="true memorability", ylabel="predicted memorability", title=title)
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path)


def _gallery(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    columns = 4
    lines = max(1, -(-len(rows) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * lines + 0.4), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=11)
    for i, ax in enumerate(fig.subplots(lines, columns, squeeze=False).ravel()):
        ax.set_axis_off()
        if i >= len(rows):
            continue
        row = rows[i]
        try:
            image = load_image(row["path"], min_size=(_THUMB, _THUMB))
            image.thumbnail((_THUMB, _THUMB))
            ax.imshow(np.asarray(image))
        except ImageLoadError as exc:  # deleted since scoring: say so in its cell
            ax.text(0.5, 0.5, exc.reason, ha="center", va="center", wrap=True, fontsize=7)
        ax.set_title(f"{Path(row['path']).name}\npred {row['predicted']:.3f} / true {row['true']:.3f}", fontsize=8)
    fig.savefig(path)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (no final newline); cells are str()-ed, `|` inside a cell is escaped."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)])


def _markdown(result: dict[str, Any], shown: dict[str, Any], files: dict[str, str]) -> str:
    summary, model = result["summary"], result["model"]
    first_info = shown["info"]
    lines = [f"# Memorability evaluation: {result['dataset']}", "",
             f"- data: `{result['root']}`; options: {json.dumps(result['options']) if result['options'] else 'none'}",
             f"- model: ResMem-Net, backbone {model.get('backbone', 'n/a')}, head {model.get('head', 'n/a')}"
             + (f", checkpoint `{result['checkpoint']}`" if result.get("checkpoint") else ""),
             f"- protocol: {first_info.get('protocol', 'n/a')}",
             f"- splits evaluated: {len(result['splits_evaluated'])} of {result['splits_available']} "
             f"({', '.join(map(str, result['splits_evaluated']))}); seed {result['seed']}",
             *([f"- image split made in code: {first_info['image_split']['method']}, test fraction "
                f"{first_info['image_split']['test_fraction']} (indices per split in result.json)"]
               if "image_split" in first_info else []),
             f"- test images listed but absent from disk: {summary['absent']}; failed to decode: "
             f"{summary['failed']} (summed over splits; both left out of the metrics)", "",
             "## Summary (mean ± std over splits)", "",
             markdown_table(["metric", "model", "human consistency"],
                             [["Spearman rho", _pm(summary["spearman"]), _pm(summary["human_consistency"])],
                              ["Pearson r", _pm(summary["pearson"]), ""], ["MSE", _pm(summary["mse"], 4), ""]]),
             "",
             "Human consistency is Spearman(half 1, half 2) of the participants' scores on the same test images"
             if summary["human_consistency"] else "This dataset has no split-half human scores.", "",
             "## Per split", ""]
    lines.append(markdown_table(
        ["split", "test images", "scored", "failed", "absent", "Spearman", "Pearson", "MSE", "human"],
        [[s["split"], s["n_images"], s["n_scored"], s["n_failed"], s["n_absent"], f"{s['metrics']['spearman']:.3f}",
          f"{s['metrics']['pearson']:.3f}", f"{s['metrics']['mse']:.4f}",
          "" if s["human_consistency"] is None else f"{s['human_consistency']:.3f}"] for s in result["splits"]]))
    lines += ["", f"## Top and bottom images by prediction (split {shown['split']}; paper Tables 3-4)", ""]
    lines.append(markdown_table(["rank", "n", "mean predicted", "mean true"],
                                [[r["rank"], r["n"], f"{r['predicted']:.3f}", f"{r['true']:.3f}"]
                                 for r in shown["top_bottom"]]))
    lines += ["", f"## Plots (split {shown['split']})", ""]
    lines += [f"![{label}]({name})" for label, name in files.items()]
    failed = [f for s in result["splits"] for f in s["failed"]]
    if failed:
        lines += ["", f"## Images that could not be scored ({len(failed)})", ""]
        lines += [f"- `{f['path']}`: {f['error']}" for f in failed[:50]]
        if len(failed) > 50:
            lines.append(f"- ... and {len(failed) - 50} more (see result.json)")
    return "\n".join(lines) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary of `resmemnet evaluate`: one line per split, the mean, what was left out."""
    lines = []
    for s in result["splits"]:
        m, human = s["metrics"], s["human_consistency"]
        lines.append(f"split {s['split']}: Spearman {m['spearman']:.3f}  Pearson {m['pearson']:.3f}  "
                     f"MSE {m['mse']:.4f}  n={m['n']} (absent {s['n_absent']}, failed {s['n_failed']})"
                     + ("" if human is None else f"  human {human:.3f}"))
    summary = result["summary"]
    line = (f"mean over {len(result['splits'])} split(s): Spearman {summary['spearman']['mean']:.3f} ± "
            f"{summary['spearman']['std']:.3f}")
    if summary["human_consistency"]:
        hc = summary["human_consistency"]
        line += f"  (human consistency {hc['mean']:.3f} ± {hc['std']:.3f})"
    lines.append(line)
    lines.append(f"left out of the metrics: {summary['absent']} listed test image(s) absent from disk, "
                 f"{summary['failed']} that failed to decode")
    return lines


def write_report(result: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write summary.md, result.json, scatter.png, top.png and bottom.png; returns their paths by name."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    shown = result["splits"][0]
    by_prediction = sorted(shown["predictions"], key=lambda row: -row["predicted"])
    files = {"scatter": "scatter.png", "top": "top.png", "bottom": "bottom.png"}
    _scatter(shown, out / files["scatter"])
    _gallery(by_prediction[:GALLERY_SIZE], f"Top {GALLERY_SIZE} by predicted memorability (split {shown['split']})",
             out / files["top"])
    _gallery(by_prediction[::-1][:GALLERY_SIZE],
             f"Bottom {GALLERY_SIZE} by predicted memorability (split {shown['split']})", out / files["bottom"])
    with atomic_write(out / "summary.md", encoding="utf-8") as f:
        f.write(_markdown(result, shown, files))
    with atomic_write(out / "result.json", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    paths = {name: out / file for name, file in files.items()}
    return {**paths, "summary": out / "summary.md", "result": out / "result.json"}
