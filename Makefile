# `make demo` and `make test` each create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Scores and Grad-CAM heatmaps from the bundled default model for redistributable sample photos.
demo: $(STAMP)
	$(VENV)/bin/resmemnet info
	$(PY) scripts/demo_images.py demo-output/images
	$(VENV)/bin/resmemnet predict demo-output/images --output demo-output/scores.csv --overwrite
	$(VENV)/bin/resmemnet explain demo-output/images --output-dir demo-output/heatmaps \
		--contact-sheet demo-output/contact_sheet.png --top 2
	@echo "scores: demo-output/scores.csv  heatmaps: demo-output/heatmaps/  overview: demo-output/contact_sheet.png"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info demo-output
