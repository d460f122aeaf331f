"""How hnswlib's search cost grows from a dataset's first rows to all of them.

A reference for `vectorflow bench`'s scale target (QPS at 1M rows against
QPS at 100k rows for the same recall): the same measurement on one hnswlib
graph (M 16, efConstruction 200, searched on one thread), so the ratio the
data itself imposes on an HNSW graph is known.

    python examples/hnswlib/scale.py DATASET_DIR --subset 100000 --ef 16,32,64,128,256,512

DATASET_DIR is a folder in the layout of shared/datasets (base.npy as
float16 unit vectors, queries.npy, gt_unfiltered_ids.npy); the subset's
ground truth is computed exactly here. Recall@10 counts a returned id as a
hit when it is among the exact top 10 or its similarity is at least the
10th-best similarity minus 1e-6 (the rule of `vectorflow bench`).
"""

import argparse
import json
import time

import hnswlib
import numpy as np


def exact_top(base, queries, k):
    """Ids and similarities of the k most similar base rows per query (inner product)."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    sims = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), 100):
        block = queries[start:start + 100] @ base.T
        top = np.argpartition(-block, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(block, top, axis=1), axis=1)
        ids[start:start + 100] = np.take_along_axis(top, order, axis=1)
        sims[start:start + 100] = np.take_along_axis(block, ids[start:start + 100], axis=1)
    return ids, sims


def measure(index, base, queries, truth_ids, k, ef, count):
    index.set_ef(max(ef, k))
    latencies = []
    hits = 0
    for q in range(count):
        started = time.perf_counter()
        labels, _ = index.knn_query(queries[q:q + 1], k=k, num_threads=1)
        latencies.append(time.perf_counter() - started)
        kth = float(queries[q] @ base[truth_ids[q, k - 1]])
        truth = set(truth_ids[q, :k].tolist())
        for label in labels[0]:
            if int(label) in truth or float(queries[q] @ base[int(label)]) >= kth - 1e-6:
                hits += 1
    total = sum(latencies)
    latencies.sort()
    return {"ef": ef, "qps": count / total, "recall": hits / (count * k),
            "p50_ms": latencies[len(latencies) // 2] * 1e3}


def run(base, queries, truth_ids, args):
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=16, ef_construction=200, random_seed=100)
    index.add_items(base, np.arange(len(base)), num_threads=args.build_threads)
    build_s = time.perf_counter() - started
    points = [measure(index, base, queries, truth_ids, args.k, ef, args.queries) for ef in args.ef]
    return {"rows": len(base), "build_s": build_s, "points": points}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--subset", type=int, default=100_000)
    parser.add_argument("--ef", default="16,32,64,128,256,512")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    args.ef = [int(e) for e in args.ef.split(",")]

    base = np.load(f"{args.dataset}/base.npy").astype(np.float32)
    queries = np.load(f"{args.dataset}/queries.npy").astype(np.float32)[:args.queries]
    truth = np.load(f"{args.dataset}/gt_unfiltered_ids.npy")[:args.queries].astype(np.int64)
    subset = base[:args.subset]
    subset_truth, _ = exact_top(subset, queries, args.k)

    results = {"dataset": args.dataset, "hnswlib": hnswlib.__version__ if hasattr(hnswlib, "__version__") else "0.8.0",
               "M": 16, "ef_construction": 200, "k": args.k, "queries": args.queries,
               "runs": [run(subset, queries, subset_truth, args), run(base, queries, truth, args)]}
    for run_result in results["runs"]:
        print(f"hnswlib {run_result['rows']} rows (build {run_result['build_s']:.1f}s)")
        for p in run_result["points"]:
            print(f"  ef {p['ef']:>4}: {p['qps']:8.0f} QPS  recall {p['recall']:.3f}  p50 {p['p50_ms']:.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
