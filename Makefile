.PHONY: install test smoke ci

install:  ## the README's install command
	pip install -c constraints.txt -e ".[test]"

test:  ## the README's test command
	python -m pytest -q

smoke:  ## one real benchmark, offline, on the bundled PBMC data
	czb run --model pca --task clustering --dataset pbmc68k_reduced --output-dir out --offline

ci:  ## what CI runs, from scratch
	bash .ci/run
