"""End-to-end smoke test of a model image: tiny weights, a tiny dataset, ``czb run``.

Run with the model's own virtual environment (``containers/venv.sh MODEL``), from the
repository root::

    .venvs/MODEL/bin/python containers/smoke.py MODEL OUT_DIR [--run]

It writes into ``OUT_DIR``:

* ``weights/``: the tiny random-initialised weights of the model's entrypoint tests
  (written by the functions of ``containers/MODEL/test_entrypoint.py``, so in the
  published file layout), laid out as the image expects them under ``/weights`` for
  the model's default variant;
* ``dataset.h5ad``: raw counts of two planted cell groups (``obs['cell_type']``) in
  three batches (``obs['batch']``), on the genes of the tiny vocabulary: ``var_names``
  Ensembl-style IDs (``ENSG`` + 11 digits), symbols in ``var['gene_symbol']``, so czb
  hands every model the kind of ID it reads;
* ``datasets.yaml``: the dataset spec ``smoke_MODEL`` pointing at that file.

Then, by hand (or with ``--run``, which needs ``czb`` on ``PATH`` and runs it with
``--no-cache`` so the container always runs)::

    czb run --model MODEL --task clustering --dataset smoke_MODEL --config-dir OUT_DIR \\
        --weights OUT_DIR/weights --gpus none --seeds 0 --format json --output-dir OUT_DIR/results

``--run`` checks what a working image gives: exit 0, status ``ok``, an image digest,
``n_weight_tensors_loaded`` > 0, the container's weights checksum equal to the host's,
and no container of the model left behind. The image must be built first
(``czb models build MODEL``; ``make smoke-models`` runs this for all six models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONTAINERS = Path(__file__).resolve().parent
sys.path.insert(0, str(CONTAINERS))
sys.path.insert(0, str(CONTAINERS / "common"))

from conftest import import_file, tiny_counts  # noqa: E402

MODELS = ("scvi", "uce", "transcriptformer", "aido_cell", "scgpt", "geneformer")
#: Cells of the smoke dataset; AIDO.Cell reads all 19,264 genes per cell (about 1 s per
#: cell on a CPU).
N_CELLS = {"aido_cell": 20}
DEFAULT_N_CELLS = 120
#: Label of each planted group of ``tiny_counts`` (cell i belongs to group i % 2).
CELL_TYPES = ("type_a", "type_b")


def load_tests(model: str):
    """Import ``containers/<model>/test_entrypoint.py`` (its weight writers and constants)."""
    return import_file(CONTAINERS / model / "test_entrypoint.py", f"czb_smoke_tests_{model}")


def write_weights(model: str, tests, folder: Path) -> None:
    """The tiny weights of the model's tests, as its default variant sits under /weights."""
    if model == "scvi":  # homo_sapiens/model.pt
        tests.write_reference(folder)
    elif model == "transcriptformer":  # tf_sapiens/{config.json,model_weights.pt,vocabs/}
        tests.write_checkpoint(folder / "tf_sapiens", {"homo_sapiens": tests.HUMAN_VOCAB})
    else:
        # uce: 4layer_model.torch, all_tokens.torch, species_*, protein_embeddings/
        # aido_cell: config.json, pytorch_model.bin
        # scgpt: args.json, vocab.json, best_model.pt
        # geneformer: model/, token, median and Ensembl-mapping dictionaries
        tests.write_weights(folder)


def write_dataset(model: str, tests, path: Path) -> dict:
    """Raw counts with two planted groups on the tiny vocabulary's genes."""
    import pandas as pd

    n_cells = N_CELLS.get(model, DEFAULT_N_CELLS)
    # AIDO.Cell knows real symbols only: its tests pick genes of the model's list.
    symbols = list(getattr(tests, "DATASET_GENES", [])) or None
    adata = tiny_counts(n_cells, seed=1, symbols=symbols, gene_id_type="ensembl", n_batches=3)
    adata.obs["cell_type"] = pd.Categorical([CELL_TYPES[i % 2] for i in range(adata.n_obs)])
    adata.write_h5ad(path)
    return {"n_cells": adata.n_obs, "n_genes": adata.n_vars}


def write_spec(model: str, dataset: Path, path: Path) -> str:
    name = f"smoke_{model}"
    # JSON strings are valid YAML scalars: no YAML library needed in the model's venv.
    path.write_text(
        "datasets:\n"
        f"  {name}:\n"
        f"    uri: {json.dumps(str(dataset))}\n"
        f"    description: {json.dumps(f'containers/smoke.py: tiny planted dataset for {model}')}\n"
        "    organism: human\n"
        "    label_key: cell_type\n"
        "    batch_key: batch\n"
        "    gene_id_type: ensembl\n"
        "    expression: raw_counts\n"
    )
    return name


def prepare(model: str, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = load_tests(model)
    weights = out_dir / "weights"
    shutil.rmtree(weights, ignore_errors=True)  # the checksum covers every file in it
    weights.mkdir()
    write_weights(model, tests, weights)
    for path in [weights, *weights.rglob("*")]:  # the container runs as another user
        path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))
    shape = write_dataset(model, tests, out_dir / "dataset.h5ad")
    name = write_spec(model, out_dir / "dataset.h5ad", out_dir / "datasets.yaml")
    n_files = sum(p.is_file() for p in weights.rglob("*"))
    print(f"{model}: {n_files} weight files, {shape['n_cells']} cells x {shape['n_genes']} genes, "
          f"dataset {name} in {out_dir}", file=sys.stderr)
    return name


def leftover_containers(model: str) -> list[str]:
    """Containers czb started for ``model`` that still exist (czb labels them)."""
    result = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=org.czb.model={model}"],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.split()


def run_and_check(model: str, out_dir: Path, dataset: str) -> list[str]:
    """``czb run`` the model on the smoke dataset; return what is wrong (empty: all good)."""
    czb = os.environ.get("CZB", shutil.which("czb") or "czb")
    cmd = [
        czb, "run", "--model", model, "--task", "clustering", "--dataset", dataset,
        "--config-dir", str(out_dir), "--weights", str(out_dir / "weights"), "--gpus", "none",
        "--seeds", "0", "--format", "json", "--output-dir", str(out_dir / "results"), "--no-cache",
    ]
    print("$ " + " ".join(cmd), file=sys.stderr)
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit code {proc.returncode}")
    try:
        records = json.loads(proc.stdout)
    except ValueError:
        records = []
        problems.append("stdout is not JSON")
    mine = [r for r in records if r.get("model", {}).get("name") == model]
    if not mine:
        problems.append("no result for the model")
    for record in mine:
        info = record["model"].get("info") or {}
        meta = info.get("container_meta") or {}
        metrics = {m["name"]: m["value"] for m in record.get("metrics", [])}
        summary = {
            "status": record.get("status"),
            "wall_s": round(wall, 1),
            "embedding_runtime_s": record.get("embedding_runtime_s"),
            "adjusted_rand_index": metrics.get("adjusted_rand_index"),
            "normalized_mutual_info": metrics.get("normalized_mutual_info"),
            "n_weight_tensors_loaded": meta.get("n_weight_tensors_loaded"),
            "cells_dropped": info.get("n_dropped_cells"),
            "image_digest": record["model"].get("image_digest"),
        }
        print(f"{model}: " + json.dumps(summary), file=sys.stderr)
        if record.get("status") != "ok":
            problems.append(f"status {record.get('status')}: {record.get('error')}")
        if not record["model"].get("image_digest"):
            problems.append("no image digest recorded")
        if not (meta.get("n_weight_tensors_loaded") or 0) > 0:
            problems.append(f"n_weight_tensors_loaded {meta.get('n_weight_tensors_loaded')}")
        checksum = meta.get("weights_checksum")
        if not checksum or checksum != info.get("weights_checksum"):
            problems.append(
                f"container weights checksum {checksum} != host's "
                f"{info.get('weights_checksum')}"
            )
    left = leftover_containers(model)
    if left:
        problems.append(f"containers left behind: {', '.join(left)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--run", action="store_true", help="also run czb on it and check the result"
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    dataset = prepare(args.model, out_dir)
    if not args.run:
        return 0
    problems = run_and_check(args.model, out_dir, dataset)
    for problem in problems:
        print(f"{args.model}: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.model}: ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
