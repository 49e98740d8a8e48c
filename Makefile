# The two commands of the README:  make demo  (set up + run the pipeline)   make test  (set up + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# pip would otherwise fetch a multi-GB CUDA torch on a machine without the pinned CPU wheel nearby
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test mutation families clean-demo help

help:
	@echo "make demo   create .venv, install requirements, collect -> train -> validate on the embedded default"
	@echo "make test   create .venv, install requirements, run the CPU test suite"
	@echo "make mutation   plant each named bug of scripts/mutation.py in a copy of the code; every one must be caught"
	@echo "make families  collect -> train -> validate on a tiny random model of every MoE family (scores meaningless)"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The seed's three stages on the embedded model and bundled corpus, sized for 2 CPU cores.
# (The seed's full recipe is in README.md; the demo shortens collection and training.)
demo: setup
	$(BIN)/python scripts/collect_traces.py --datasets bundled --target_traces 600 --shard_size 100 \
		--batch_size 8 --max_length 128 --output $(DEMO)/traces --overwrite
	$(BIN)/python scripts/train_simple_predictor.py --traces $(DEMO)/traces --shards-per-group 4 \
		--batch-size 8 --lr 1e-3 --epochs 5 --output $(DEMO)/simple --overwrite
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type router \
		--lookahead 0 --quiet --output-dir $(DEMO)/router
	$(BIN)/python scripts/validate_coverage_analysis.py --traces $(DEMO)/traces --model-type random \
		--quiet --output-dir $(DEMO)/random
	$(BIN)/python scripts/validate_coverage_analysis.py --checkpoint $(DEMO)/simple/best_checkpoint.pth \
		--model-type simple --batch-size 16
	@echo "demo outputs: $(DEMO)/ (traces, checkpoints, coverage_metrics.json, coverage_analysis.png)"

test: setup
	$(BIN)/python -m pytest -q

# Each named bug (scripts/mutation.py --list) in a temporary copy of the repository, one at a time; its tests
# must fail. The working tree is never changed. Exit 1 if any bug survives.
mutation: setup
	$(BIN)/python scripts/mutation.py

# One line per supported MoE family (docs/FAMILIES.md); random weights, so only "it ran" means anything.
families: setup
	$(BIN)/python scripts/family_smoke.py --families all

clean-demo:
	rm -rf $(DEMO)
