# Two commands on a fresh machine: `make reproduce` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechun-installed
OUT ?= runs/reproduce
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test reproduce lint bench clean

setup: $(STAMP)

# A CPU build of torch where there is no GPU (pip takes it from local disk here); the CUDA build otherwise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip>=23"  # no-op (and no index query) when the venv already has it
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		$(PY) -m pip install -q "torch==2.13.0"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job on the embedded model organism (the 5-seed RMU headline; `mechun reproduce rmu-shallow` adds the strength
# sweep); writes $(OUT)/report.html and $(OUT)/results.json. --overwrite lets a
# second run replace the first one's output (only files mechun wrote there; it reuses the trained organism).
reproduce: $(STAMP)
	$(VENV)/bin/mechun reproduce rmu-shallow --no-sweep --out $(OUT) --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check mechun tests analyses benchmarks

bench: $(STAMP)
	$(PY) benchmarks/cache_overhead.py

clean:
	rm -rf runs .pytest_cache
