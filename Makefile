# Two commands for a fresh machine: `make run` (set up + the default BayesTune run) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/default
STAMP  := $(VENV)/.installed

.PHONY: setup run test notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, at the release the machine caches (a newer one would download gigabytes).
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/bayestune run --out $(OUT) --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# re-execute every notebook in its full setting and store the outputs (runs go to runs/notebooks)
notebooks: $(STAMP)
	mkdir -p runs/notebooks
	for nb in notebooks/*.ipynb; do $(VENV)/bin/papermill --cwd runs/notebooks -k python3 "$$nb" "$$nb" || exit 1; done

clean:
	rm -rf $(VENV) runs
