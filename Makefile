# Two commands on a fresh machine: `make reproduce` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechun-installed
LAB_STAMP := $(VENV)/.mechun-notebook-installed
COMMA := ,
OUT ?= runs/reproduce
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test reproduce results lab notebooks lint bench clean

setup: $(STAMP)

# A CPU build of torch where there is no GPU (pip takes it from local disk here); the CUDA build otherwise.
# uv installs (about 1 min cold, against 2.5-3 min for pip); it is told pip's find-links so that it sees the same
# local CPU wheel, and compiles bytecode as pip does (where PYTHONDONTWRITEBYTECODE is set, every notebook kernel and
# subprocess would otherwise recompile torch and transformers). Without uv (no registry has it), pip does the job.
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip>=23" uv || $(PY) -m pip install -q "pip>=23"
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		torch="torch>=2.6"; else torch="torch==2.13.0"; fi; \
	links="$$($(PY) -m pip config get global.find-links 2>/dev/null || true)"; \
	links="$${PIP_FIND_LINKS:-$$links}"; \
	if test -x $(VENV)/bin/uv; then \
		UV_FIND_LINKS="$${UV_FIND_LINKS:-$$links}" $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) \
			"$$torch" -e ".[$(1)]"; \
	else \
		$(PY) -m pip install -q "$$torch" && $(PY) -m pip install -q -e ".[$(1)]"; \
	fi
endef

$(STAMP): pyproject.toml
	$(call install,dev)
	touch $(STAMP)

# The notebook extra (JupyterLab, ipywidgets) on top of the dev set-up.
$(LAB_STAMP): $(STAMP)
	$(call install,dev$(COMMA)notebook)
	touch $(LAB_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job on the embedded model organism (the 5-seed RMU headline; `mechun reproduce rmu-shallow` adds the strength
# sweep); writes $(OUT)/report.html and $(OUT)/results.json. --overwrite lets a
# second run replace the first one's output (only files mechun wrote there; it reuses the trained organism).
reproduce: $(STAMP)
	$(VENV)/bin/mechun reproduce rmu-shallow --no-sweep --out $(OUT) --overwrite

# Open the notebooks in JupyterLab (installs the notebook extra on first use). LAB_ARGS passes options, e.g.
# make lab LAB_ARGS="--no-browser --port 8890". As root (containers), JupyterLab needs --allow-root: given then.
lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $$(test "$$(id -u)" = 0 && echo --allow-root) $(LAB_ARGS)

# Execute every notebook on the main organism and save it with its outputs (the committed notebooks come from this).
notebooks: $(LAB_STAMP)
	$(PY) notebooks/execute.py

# Every analysis in full on the main organism (seed 0), and the organism report for organism seeds 0-2, each into
# $(RESULTS)/NAME, printing each one's time (no file of its own there): what the README's numbers come from. Trainer 6
# on a 2-core machine: 64 min with the organisms of seeds 0-2 cached (59 min for the analyses, 10 of them training
# the retain oracle; 5 min for the organism reports); from a cold cache add about 10 min per organism (30 min);
# about twice that on a slower machine.
RESULTS ?= runs/results
ANALYSES := rmu-shallow localized-editing sae-unlearning depth edit-specificity restore depth-benchmark
results: $(STAMP)
	mkdir -p $(RESULTS); set -e; for a in $(ANALYSES); do \
		start=$$(date +%s); $(VENV)/bin/mechun reproduce $$a --out $(RESULTS)/$$a --overwrite; \
		echo "$$a: $$(( $$(date +%s) - start )) s"; done; \
	for s in 0 1 2; do \
		start=$$(date +%s); $(VENV)/bin/mechun reproduce organism --seed $$s --out $(RESULTS)/organism-seed$$s --overwrite; \
		echo "organism seed $$s: $$(( $$(date +%s) - start )) s"; done

lint: $(STAMP)
	$(VENV)/bin/ruff check mechun tests analyses benchmarks

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf runs .pytest_cache
