.PHONY: install test smoke ci

install:  ## the README's install command
	pip install -c constraints.txt -e ".[test]"

test:  ## the README's test command: host suite, then each model's entrypoint tests in its own venv
	python -m pytest -q
	bash containers/test.sh

smoke:  ## one real benchmark, offline, on the bundled PBMC data
	czb run --model pca --task clustering --dataset pbmc68k_reduced --output-dir out --offline

ci:  ## what CI runs, from scratch
	bash .ci/run
