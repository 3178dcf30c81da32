.PHONY: install test smoke smoke-models ci

install:  ## the README's install command
	pip install -c constraints.txt -e ".[test,cluster]"

test:  ## the README's test command: host suite, then each model's entrypoint tests in its own venv
	python -m pytest -q
	bash containers/test.sh

smoke:  ## one real benchmark, offline, on the bundled PBMC data
	czb run --model pca --task clustering --dataset pbmc68k_reduced --output-dir out --offline

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
