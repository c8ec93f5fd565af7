# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything (pip is a no-op when it is already there).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DR     := $(VENV)/bin/dr
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= out/demo

.PHONY: install demo test lint bench clean reproduce bootstrap gpu-check gpu-bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DR) make-corpus $(DEMO)/corpus --split web --shards 4 --per-shard 32 --seed 0
	$(DR) bootstrap teachers/synthetic.yaml --verify
	$(DR) reinforce --config jobs/configs/demo.yaml --force
	$(DR) validate $(DEMO)/dataset
	$(DR) inspect $(DEMO)/dataset --out $(DEMO)/contact_sheet.png
	$(DR) export $(DEMO)/dataset --format datacompdr --out $(DEMO)/datacompdr
	@echo
	@echo "base corpus      : $(DEMO)/corpus/{tar,parquet}/"
	@echo "reinforced shards: $(DEMO)/dataset/shards/*.parquet  (markers: _markers/, manifest.json)"
	@echo "contact sheet    : $(DEMO)/contact_sheet.png"
	@echo "DataCompDR export: $(DEMO)/datacompdr/*.tar"

# Reinforced vs plain student on the synthetic domain, with the committed teachers
# (results, plot: reproduce/; corpora, dataset, runs: out/reproduce/).
reproduce: $(STAMP)
	$(DR) bootstrap teachers/synthetic.yaml --verify
	$(DR) reproduce --config jobs/configs/reproduce.yaml

# Regenerate the committed teachers (teachers/synthetic/: checkpoints, SHA256SUMS, bootstrap.json;
# ~63 min on 2 CPUs, bit-identical on the same machine type and thread counts).
bootstrap: $(STAMP)
	$(DR) bootstrap teachers/synthetic.yaml

# Lint and format check first (ruff, configured in pyproject.toml), then the suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check dr_pipeline tests jobs
	$(VENV)/bin/ruff format --check dr_pipeline tests jobs

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m dr_pipeline.bench --out BENCHMARKS.md

# On a CUDA machine: the demo job with bf16 autocast vs the CPU fp32 run (cosine >= 0.99 per
# vector, identical aug params, identical greedy captions); without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) -m dr_pipeline.gpu_check

# On a CUDA machine: only the GPU section of the bench (2 x ViT-L-14 images/s, coca_ViT-L-14
# captions/s, accelerator busy fraction; <= 8 min), written to BENCHMARKS-gpu.md and
# bench/results-<gpu>.json. Without CUDA: "skipped: no CUDA", nothing written.
gpu-bench: $(STAMP)
	$(PY) -m dr_pipeline.bench --only gpu --out BENCHMARKS-gpu.md

clean:
	rm -rf out .pytest_cache
