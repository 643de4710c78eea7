# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Installs go through constraints.txt, which pins torch==2.13.0 (the local CPU build here); on a GPU
# machine, install without it (see README) to get the CUDA build you need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,gptq,bnb
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: setup demo test data-stats clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that no later requirement can pull a CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The main job on the embedded default dataset (MovieLens-100K from the recbole wheel on PyPI).
demo: setup
	$(VENV)/bin/iisan data fetch ml-100k
	$(VENV)/bin/iisan data stats ml-100k

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# make data-stats DATASET=scientific
data-stats: setup
	$(VENV)/bin/iisan data stats $(DATASET)

clean:
	rm -rf $(VENV) .pytest_cache
