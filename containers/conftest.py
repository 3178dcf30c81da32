"""Shared helpers of the per-model entrypoint tests (``from conftest import ...``).

Each model's tests run in that model's own virtual environment (``containers/venv.sh
MODEL``), the same packages its image installs, with the model's real code at a tiny
random-initialised size; weights are written by the test in the published format, so
the real weight-loading path runs too. Here: ``Entrypoint`` (a model's entrypoint run
in-process on job folders), the host's side (``tiny_counts``, ``write_job``) and checks of
what a run left (``read_output``, ``assert_failed``, ``assert_not_applicable``, ...).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

CONTAINERS = Path(__file__).resolve().parent
sys.path.insert(0, str(CONTAINERS / "common"))

import czb_container  # noqa: E402


def import_file(path: Path, name: str):
    """Import the module at ``path`` as ``name`` (model folders are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_entrypoint(model: str):
    """Import ``containers/<model>/entrypoint.py`` under a unique module name."""
    return import_file(CONTAINERS / model / "entrypoint.py", f"czb_entrypoint_{model}")


class Entrypoint:
    """One model's entrypoint, run in-process under the contract as its image runs it.

    ``dataset`` makes a job's counts when a test gives none; ``request`` holds the model's
    default request fields, which a test's own fields override (``parameters`` key by key).
    """

    def __init__(self, model: str, *, package: str, dataset=None, **request):
        self.model = model
        self.package = package
        self.module = load_entrypoint(model)
        self.dataset = dataset or tiny_counts
        self.request = {"model": model, **request}

    def job(self, tmp_path: Path, adata=None, **request) -> dict[str, Path]:
        """Write a job's folders under ``tmp_path`` (made when missing), as the host does."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        adata = self.dataset() if adata is None else adata
        parameters = {**self.request.get("parameters", {}), **request.get("parameters", {})}
        request = {**self.request, **request}
        if parameters:
            request["parameters"] = parameters
        return write_job(tmp_path, adata, **request)

    def run(self, dirs: dict[str, Path], weights: Path | None = None) -> int:
        """Run the entrypoint on a job's folders (weights from ``weights`` when given)."""
        return czb_container.run(
            self.module.embed,
            model=self.model,
            package=self.package,
            input_dir=dirs["input"],
            weights_dir=weights or dirs["weights"],
            output_dir=dirs["output"],
        )


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


def embeddings(dirs: dict[str, Path]) -> np.ndarray:
    """The embeddings a run wrote."""
    return read_output(dirs["output"])[0]


def reason(dirs: dict[str, Path]) -> str:
    """The one-line reason a failed or not-applicable run wrote."""
    return json.loads((dirs["output"] / czb_container.REASON_FILE).read_text())["reason"]


def assert_failed(code: int, dirs: dict[str, Path], *words: str) -> None:
    """A failed run: exit code 1, no output files, and a reason naming each of ``words``."""
    assert code == 1
    outputs = (czb_container.META_FILE, czb_container.EMBEDDINGS_FILE, czb_container.CELL_IDS_FILE)
    for name in outputs:
        assert not (dirs["output"] / name).exists()
    for word in words:
        assert word in reason(dirs)


def assert_not_applicable(code: int, dirs: dict[str, Path]) -> None:
    """A not-applicable run: exit code 99 and no meta."""
    assert code == 99
    assert not (dirs["output"] / czb_container.META_FILE).exists()


def without_known_genes(adata, cell: int, n_known: int):
    """``adata`` with ``cell``'s counts zeroed in the first ``n_known`` genes (those the
    model knows), so it keeps counts only in genes the model lacks."""
    x = adata.X.tolil()
    x[cell, :n_known] = 0
    adata.X = x.tocsr()
    return adata


def assert_one_cell_dropped(code: int, dirs: dict[str, Path], cell: str, n_cells: int) -> None:
    """A run that left ``cell`` out, kept the other ``n_cells - 1`` and counted the drop."""
    assert code == 0
    values, ids, meta = read_output(dirs["output"])
    assert cell not in ids and len(ids) == values.shape[0] == n_cells - 1
    assert meta["n_cells_dropped"] == 1


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``folder``, to see it unchanged."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }
