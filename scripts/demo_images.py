"""Copy a handful of redistributable photos (people, a cat, food, objects) into a folder for `make demo`.

They come from packages already installed, so the demo needs no download and no research dataset:
matplotlib's sample data and scikit-image's bundled data (the `demo` extra).

    .venv/bin/python scripts/demo_images.py demo-output/images
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

# (package, file inside the package, what it shows, licence as its package documents it)
SAMPLES = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a portrait", "public domain (U.S. Navy photo)"),
    ("skimage", "data/astronaut.png", "an astronaut", "public domain (NASA)"),
    ("skimage", "data/chelsea.png", "a cat", "CC0 (Stefan van der Walt)"),
    ("skimage", "data/coffee.png", "a cup of coffee", "CC0 (Rachel Michetti)"),
    ("skimage", "data/rocket.jpg", "a rocket launch", "public domain (SpaceX/NASA)"),
)


def copy_samples(out: Path) -> list[Path]:
    """Copy every sample whose package is installed; say which are missing and how to get them."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for package, relative, what, licence in SAMPLES:
        spec = find_spec(package)
        source = Path(next(iter(spec.submodule_search_locations))) / relative if spec else None
        if source is None or not source.is_file():
            print(f"skipped {relative} ({what}): install {package} (pip install 'resmemnet[demo]')", file=sys.stderr)
            continue
        copied.append(Path(shutil.copy2(source, out / source.name)))
        print(f"{source.name}: {what}; {licence}")
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to copy the photos into")
    if not copy_samples(parser.parse_args(argv).out):
        print("no sample photo found: pip install matplotlib scikit-image", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
