# The two commands of the README:  make demo  (set up + run the pipeline)   make test  (set up + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Without a GPU, take torch's CPU-only build (about 0.2 GB) instead of PyPI's CUDA build (several GB):
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIN := $(shell grep '^torch==' requirements.txt)

.PHONY: setup demo test test-slow mutation families clean-demo help

help:
	@echo "make demo   create .venv, install requirements, collect -> train -> validate on the embedded default (runs/demo/)"
	@echo "make test   create .venv, install requirements, run the CPU test suite (without the slow tests)"
	@echo "make test-slow   the slow tests alone (.ci/run runs make test, make test-slow, make mutation)"
	@echo "make mutation   plant each named bug of tools/mutation.py in a copy of the code; every one must be caught"
	@echo "make families  collect -> train -> validate on a tiny random model of every MoE family (scores meaningless)"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: error: Python 3.10+ needed, $(PYTHON) is " + sys.version.split()[0] + "; make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV) || { echo "make: error: $(PYTHON) -m venv failed; on Debian/Ubuntu: apt install python3-venv"; exit 2; }
	$(if $(TORCH_INDEX),$(BIN)/pip install -q "$(TORCH_PIN)" --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The three stages on the embedded model and bundled corpus, sized for 2 CPU cores (README.md gives the time):
# 600 texts cut to 64 tokens (100 per domain); a layer-aware predictor of layer l+1's experts, trained 2 epochs;
# the two sanity controls, router reuse (the training-free prefetcher to beat) and the predictor on the test split;
# the traces' temporal locality (previous-token recall); then the prefetch simulator on the test split with the
# predictor and router reuse at three cache sizes (seconds; a cost model's prediction, labelled "simulated").
# The seed's full-size commands are in README.md.
# One thread per process: the demo's matrices are small, and on a busy machine two OpenMP threads spin-wait on
# each other (the whole demo on 2 cores at load average 11: 2:20 with one thread, 8:24 with two).
demo: export OMP_NUM_THREADS ?= 1
demo: setup
	$(BIN)/python scripts/collect_traces.py --datasets bundled --target_traces 600 --shard_size 100 \
		--batch_size 16 --max_length 64 --no-logits --output $(DEMO)/traces --overwrite
	$(BIN)/python scripts/train_simple_predictor.py --traces $(DEMO)/traces --model-type layer-aware --lookahead 1 \
		--lr 3e-3 --dropout 0 --epochs 2 --batch-rows 2048 --output $(DEMO)/layer-aware-d1 --overwrite
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type router --lookahead 0 \
		--quiet --output-dir $(DEMO)/router-d0
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type random \
		--quiet --output-dir $(DEMO)/random-d0
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type router-reuse --lookahead 1 \
		--quiet --output-dir $(DEMO)/router-reuse-d1
	$(BIN)/python scripts/validate_coverage_analysis.py --checkpoint $(DEMO)/layer-aware-d1/best_checkpoint.pth --quiet
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type previous-token \
		--quiet --output-dir $(DEMO)/previous-token-d0
	$(BIN)/python scripts/simulate_prefetch.py --traces $(DEMO)/traces --lookahead 1 --cache-experts 8,15,30 \
		--policies on-demand,prefetch:router-reuse,prefetch:$(DEMO)/layer-aware-d1/best_checkpoint.pth \
		--output-dir $(DEMO)/prefetch-d1
	$(BIN)/python tools/demo_summary.py $(DEMO)

# The CPU suite without the tests marked slow (each longer than ~20 s on 2 cores); .ci/run also runs those
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests alone (the documents' seconds-long commands really run, end-to-end trainings, multi-process runs)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Each named bug (tools/mutation.py --list) in a temporary copy of the repository, one at a time; its tests
# must fail. The working tree is never changed. Exit 1 if any bug survives.
mutation: setup
	$(BIN)/python tools/mutation.py

# One line per supported MoE family (docs/FAMILIES.md); random weights, so only "it ran" means anything.
families: setup
	$(BIN)/python tools/family_smoke.py --families all

clean-demo:
	rm -rf $(DEMO)
