.PHONY: install env demo test smoke smoke-models ci

# The active virtual environment, else .venv (made by `make env` when missing).
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python

install:  ## the README's install command, into the current environment
	pip install -c constraints.txt -e ".[test,cluster]"

env:  ## $(VENV) with czb and its test tools installed (once; later calls only check)
	@$(PY) -c "import czb, pytest" 2>/dev/null || { \
		[ -x $(PY) ] || python3 -m venv $(VENV); \
		$(PY) -m pip install --quiet --upgrade "pip<27" && \
		$(PY) -m pip install --quiet -c constraints.txt -e ".[test,cluster]"; }

demo: env  ## the PBMC benchmark offline (PCA and random embeddings, two tasks) and its HTML report
	$(VENV)/bin/czb run --model pca --model random --task clustering --task embedding \
		--dataset pbmc68k_reduced --offline --output-dir czb-demo
	$(VENV)/bin/czb report czb-demo -o czb-demo/report.html

test: env  ## the README's test command: host suite, then each model's entrypoint tests in its own venv
	$(PY) -m pytest -q
	bash containers/test.sh

smoke: env  ## one real benchmark, offline, on the bundled PBMC data
	$(VENV)/bin/czb run --model pca --task clustering --dataset pbmc68k_reduced --output-dir out --offline

# Each model image end to end through Docker and `czb run` (tiny random weights of the
# entrypoint tests, a planted dataset, CPU): containers/smoke.py --run, in each model's venv.
# Needs czb on PATH and the images built first (not done here):
#   czb models build MODEL [--base-image IMG]     for each of SMOKE_MODELS
SMOKE_MODELS ?= scvi uce transcriptformer aido_cell scgpt geneformer
SMOKE_DIR ?= czb-smoke
smoke-models:  ## every model image on tiny weights through `czb run` (build the images first)
	@status=0; for model in $(SMOKE_MODELS); do \
		[ -x .venvs/$$model/bin/python ] || bash containers/venv.sh $$model >/dev/null; \
		.venvs/$$model/bin/python containers/smoke.py --run $$model $(SMOKE_DIR)/$$model || status=1; \
	done; exit $$status

ci:  ## what CI runs, from scratch
	bash .ci/run
