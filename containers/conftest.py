"""Shared fixtures of the per-model entrypoint tests.

Each model's tests run in that model's own virtual environment (``containers/venv.sh
MODEL``), the same packages its image installs, with the model's real code at a tiny
random-initialised size; weights are written by the test in the published format, so
the real weight-loading path runs too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

CONTAINERS = Path(__file__).resolve().parent
sys.path.insert(0, str(CONTAINERS / "common"))

import czb_container  # noqa: E402


@pytest.fixture
def contract():
    return czb_container


def load_entrypoint(model: str):
    """Import ``containers/<model>/entrypoint.py`` under a unique module name."""
    path = CONTAINERS / model / "entrypoint.py"
    spec = importlib.util.spec_from_file_location(f"czb_entrypoint_{model}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_counts(
    n_cells: int = 40,
    n_genes: int = 60,
    *,
    seed: int = 0,
    symbols: list[str] | None = None,
    ensembl_ids: list[str] | None = None,
    gene_id_type: str = "symbol",
    n_batches: int = 2,
):
    """Raw counts with two planted cell groups, as the host writes them.

    ``var_names`` hold the IDs of ``gene_id_type``; ``var['gene_symbol']`` and
    ``var['ensembl_id']`` hold both kinds; ``obs['batch']`` a batch label.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    symbols = symbols or [f"GENE{i}" for i in range(n_genes)]
    ensembl_ids = ensembl_ids or [f"ENSG{i:011d}" for i in range(n_genes)]
    n_genes = len(symbols)
    group = np.arange(n_cells) % 2
    rate = rng.gamma(2.0, 1.0, size=(2, n_genes))
    counts = rng.poisson(rate[group] * 3).astype(np.float32)
    var = pd.DataFrame({"gene_symbol": symbols, "ensembl_id": ensembl_ids})
    var.index = pd.Index(symbols if gene_id_type == "symbol" else ensembl_ids)
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i % n_batches}" for i in range(n_cells)])},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def write_job(tmp_path: Path, adata, **request) -> dict[str, Path]:
    """Write ``dataset.h5ad`` and ``request.json`` as the host does; return the three folders."""
    dirs = {name: tmp_path / name for name in ("input", "weights", "output")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    adata.write_h5ad(dirs["input"] / czb_container.DATASET_FILE)
    request.setdefault("model", "test")
    (dirs["input"] / czb_container.REQUEST_FILE).write_text(json.dumps(request))
    return dirs


def read_output(output_dir: Path):
    """Embeddings, cell IDs and meta written by an entrypoint."""
    values = np.load(output_dir / czb_container.EMBEDDINGS_FILE, allow_pickle=False)
    ids = json.loads((output_dir / czb_container.CELL_IDS_FILE).read_text())
    meta = json.loads((output_dir / czb_container.META_FILE).read_text())
    return values, ids, meta
