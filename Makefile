# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Installs go through constraints.txt, which pins torch==2.13.0 (the local CPU build here); on a GPU
# machine, install without it (see README) to get the CUDA build you need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,gptq,bnb,parquet,tune,faiss,serve
export GPTQMODEL_CPU_WORKERS ?= 2
NPROC ?= 1

.PHONY: setup demo test test-fast docs data-stats extract train bench bench-extract bench-cache bench-scale study check-ui bench-serve gpu-pack gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "installing into $(VENV) (log: $(VENV)/install.log); the first time takes a few minutes"
	$(PYTHON) -m venv $(VENV)
	@# torch first and pinned, so that no later requirement can pull a CUDA build.
	@( $(PY) -m pip install --upgrade pip && \
	   $(PY) -m pip install -c constraints.txt torch && \
	   $(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]" ) > $(VENV)/install.log 2>&1 \
	  || (tail -40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1)
	@touch $@

# The main job on the embedded default dataset (MovieLens-100K from the recbole wheel on PyPI).
demo: setup
	$(VENV)/bin/iisan data fetch ml-100k
	$(VENV)/bin/iisan data stats ml-100k
	$(VENV)/bin/iisan demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the tests not marked slow (no wheel builds, downloads, subprocesses or long training): a quick check while working
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# docs/cli.md from the commands themselves (tests/test_cli_vocabulary.py fails when it is stale)
docs: setup
	$(PY) -c "from pathlib import Path; from iisan.cli import cli_markdown; Path('docs/cli.md').write_text(cli_markdown(), encoding='utf-8')"

# make data-stats DATASET=scientific
DATASET ?= ml-100k
MODEL ?= minilm-l6
data-stats: setup
	$(VENV)/bin/iisan data stats $(DATASET)

# Stage 1: make extract MODEL=minilm-l6 DATASET=scientific [NPROC=2] [ARGS="--layers all"]
# NPROC > 1 shards the items over that many processes (one per GPU) with torchrun.
extract: setup
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) --no-python,) \
	  $(VENV)/bin/iisan extract --model $(MODEL) --dataset $(DATASET) $(ARGS)

# Stage 2: make train DATASET=scientific [PIPELINE=text-only] [ARGS="--seeds 3"] [NPROC=2]
# NPROC > 1 trains in that many processes (DDP, one per GPU; gloo on CPU) with torchrun; --batch-size stays
# the global batch and the results are those of one process (docs/design.md, "Distributed training").
PIPELINE ?=
train: setup
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) --no-python,) \
	  $(VENV)/bin/iisan train --dataset $(DATASET) $(if $(PIPELINE),--pipeline $(PIPELINE),) $(ARGS)

# Training cost of every method (FFT, Adapter, LoRA, BitFit, uncached and cached IISAN) on the same data,
# encoders, seed and batch size: reports/bench-ml-100k.md (title + poster) and reports/bench-scientific.md
# (title text), each with two PNG plots. Missing caches are extracted first. make bench ARGS="--full" also
# trains every method to convergence (long on CPU).
bench: setup
	$(VENV)/bin/iisan data fetch ml-100k
	$(VENV)/bin/iisan bench --dataset ml-100k $(ARGS)
	$(VENV)/bin/iisan bench --dataset scientific $(ARGS)

# The papers' experiments as one resumable command: make study [PLAN=paper] [ARGS="--dataset ml-100k"]
# (plans/*.yaml; reports/study-PLAN.{json,md} and its plots). Running it again continues where it stopped.
PLAN ?= quick
study: setup
	$(VENV)/bin/iisan data fetch ml-100k
	$(VENV)/bin/iisan study run --plan $(PLAN) $(ARGS)

# The serving page in headless Chromium (apt-get install chromium): make check-ui RUN=runs/ml-100k/<run>
# writes reports/ui-<dataset>.png. A manual check, not part of CI.
check-ui: setup
	$(PY) -m iisan.deploy.check_ui $(RUN)

# The server's requests/s and p50 / p99 latency at 1 and 16 clients: make bench-serve RUN=runs/ml-100k/<run>
bench-serve: setup
	$(PY) -m iisan.deploy.bench_serve $(RUN)

# Extraction items/s next to the bare forward pass, for a text and an image encoder.
# Cost against size on synthetic data, memory and mmap cache modes (reports/bench-scale.md); the full ladder
# goes to 1M items x 200k users and needs about 12 GB of disk: make bench-scale [SIZES=items:users,...]
bench-scale: setup
	$(PY) -m iisan.experiments.scale $(if $(SIZES),--sizes $(SIZES))

bench-extract: setup
	$(VENV)/bin/iisan data fetch ml-100k
	$(PY) -m iisan.extract.bench --model minilm-l6 --dataset scientific --limit 4096
	$(PY) -m iisan.extract.bench --model dinov2-small --dataset ml-100k --limit 256

# Cache I/O: write, load and gather at Scientific's size, zarr vs HDF5.
bench-cache: setup
	$(PY) -m iisan.cache_store.bench

clean:
	rm -rf $(VENV) .pytest_cache

# The GPU path, checked on a GPU machine in a few minutes (experiments/gpu_check.py). Here: make gpu-pack puts
# into the ignored .gpu/ what that machine lacks (Scientific's TSVs, minilm-l3, this package and zarr as
# wheels for its Python, GPU_PY). There, with .gpu/ beside the checkout: make gpu-check (uses its python3).
GPU_PY ?= 3.12
GPU_WHEELS ?= zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
gpu-pack: setup
	rm -rf .gpu && mkdir -p .gpu/whl .gpu/data .gpu/models
	cp -r ../shared/data/scientific .gpu/data/ && cp -r ../shared/models/minilm-l3 .gpu/models/
	chmod -R u+w .gpu
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl .
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu/whl $(GPU_WHEELS)
	du -sh .gpu

gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
	@# run outside the checkout: its iisan/ folder would shadow the installed package's layout (the package finds its
	@# registry and plans under /tmp/site/share/iisan-versa, where a --target install puts them)
	cd /tmp && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m iisan.experiments.gpu_check --pack $(CURDIR)/.gpu \
	  --out $${OUT:-$(CURDIR)/reports}
