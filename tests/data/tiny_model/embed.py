"""A tiny model that follows czb's container contract, written from the README alone.

Reads /input/request.json and /input/dataset.h5ad (CSR counts, read with h5py), multiplies
log1p(counts scaled to the median total) by /weights/projection.npy, drops cells with fewer than
parameters.min_genes expressed genes, and writes /output/embeddings.npy,
/output/cell_ids.json and, last, /output/meta.json, whose weights_checksum is the sha256
of the one weights file (the README accepts that form for a folder holding one file).
Exits 99 when the organism is not
in parameters.organisms. Test hooks: parameters.sleep_s (sleep midway, after writing a
partial file), parameters.allocate_mb (allocate that much memory) and parameters.probe
(report the sandbox it runs in).

Perturbation requests (request.task) are answered with "no change": the mean
log-normalised expression of the control cells, for every test condition
(perturbation_expression_shift) or every selected cell (perturbation_masked_gene),
written to /output/predictions.h5ad with anndata.
"""

import hashlib
import json
import os
import socket
import sys
import time

import h5py
import numpy as np


def read_counts(path):
    with h5py.File(path, "r") as f:
        x = f["X"]
        n_cells, n_genes = x.attrs["shape"]
        data, indices, indptr = x["data"][:], x["indices"][:], x["indptr"][:]
        obs = f["obs"]
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in obs[obs.attrs["_index"]][:]]
    dense = np.zeros((n_cells, n_genes), dtype=np.float32)
    for row in range(n_cells):
        dense[row, indices[indptr[row]:indptr[row + 1]]] = data[indptr[row]:indptr[row + 1]]
    return dense, ids


def probe():
    status = open("/proc/self/status").read()
    cap_eff = [line.split()[1] for line in status.splitlines() if line.startswith("CapEff")][0]
    try:
        open("/opt/tiny/written", "w").close()
        rootfs_writable = True
    except OSError:
        rootfs_writable = False
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=2).close()
        network = True
    except OSError:
        network = False
    interfaces = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
    return {
        "uid": os.getuid(),
        "cap_eff": cap_eff,
        "rootfs_writable": rootfs_writable,
        "network": network,
        "interfaces": interfaces,
        "docker_socket": os.path.exists("/var/run/docker.sock"),
        "tmp_writable": os.access("/tmp", os.W_OK),
        "weights_writable": os.access("/weights", os.W_OK),
        "input_writable": os.access("/input", os.W_OK),
        "shm_bytes": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
    }


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def log_normalize(counts):
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return np.log1p(counts / totals * 1e4)


def predict_perturbations(request, started):
    import anndata as ad
    import pandas as pd

    adata = ad.read_h5ad("/input/" + request.get("dataset_file", "dataset.h5ad"))
    counts = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    conditions = adata.obs[request["condition_key"]].astype(str).to_numpy()
    control = log_normalize(counts[conditions == request["control_label"]]).mean(axis=0)
    if request["task"] == "perturbation_expression_shift":
        rows = list(request["test_conditions"])
    else:
        rows = list(adata.obs_names[adata.obs["selected"].to_numpy()])
    predictions = np.tile(control, (len(rows), 1)).astype(np.float32)
    out = ad.AnnData(X=predictions, obs=pd.DataFrame(index=pd.Index(rows)),
                     var=pd.DataFrame(index=adata.var_names.copy()))
    out.write_h5ad("/output/predictions.h5ad")
    meta = {"model": request["model"], "version": "1.0", "weights_checksum": None,
            "n_weight_tensors_loaded": 0, "device": request["device"], "task": request["task"],
            "timings": {"total_s": time.time() - started}}
    json.dump(meta, open("/output/meta.json", "w"))
    print(f"predicted {len(rows)} rows", flush=True)
    return 0


def main():
    started = time.time()
    request = json.load(open("/input/request.json"))
    params = request.get("parameters", {})
    if request.get("task", "embedding") != "embedding":
        return predict_perturbations(request, started)
    if request["organism"] not in params.get("organisms", ["human"]):
        json.dump({"status": "not_applicable", "reason": f"no {request['organism']} support"},
                  open("/output/reason.json", "w"))
        print(f"organism {request['organism']} not supported", file=sys.stderr)
        return 99
    counts, ids = read_counts("/input/" + request.get("dataset_file", "dataset.h5ad"))
    print(f"read {counts.shape[0]} cells x {counts.shape[1]} genes", flush=True)
    if params.get("allocate_mb"):
        print(f"allocating {params['allocate_mb']} MB", flush=True)
        np.ones(int(params["allocate_mb"]) * 2**20 // 8)
    projection = np.load("/weights/projection.npy")
    if projection.shape[0] != counts.shape[1]:
        print(f"projection has {projection.shape[0]} rows for {counts.shape[1]} genes", file=sys.stderr)
        return 3
    keep = (counts > 0).sum(axis=1) >= params.get("min_genes", 0)
    rng = np.random.default_rng(request["seed"])
    kept = counts[keep]
    totals = np.maximum(kept.sum(axis=1, keepdims=True), 1)
    normalized = np.log1p(kept / totals * np.median(totals))
    values = normalized @ projection
    values += rng.normal(scale=1e-3, size=values.shape)
    np.save("/output/embeddings.npy", values.astype(np.float32))
    if params.get("sleep_s"):
        print("sleeping", flush=True)
        time.sleep(params["sleep_s"])
    json.dump([i for i, k in zip(ids, keep) if k], open("/output/cell_ids.json", "w"))
    meta = {
        "model": request["model"],
        "version": "1.0",
        "weights_checksum": file_sha256("/weights/projection.npy"),
        "n_weight_tensors_loaded": 1,
        "device": request["device"],
        "timings": {"total_s": time.time() - started},
        "n_cells_dropped": int((~keep).sum()),
    }
    if params.get("probe"):
        meta["probe"] = probe()
    json.dump(meta, open("/output/meta.json", "w"))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
