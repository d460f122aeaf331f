"""QPS at a large size against QPS at a small size, for the same recall.

The scale target of `vectorflow bench` compares the engine's QPS on a
dataset's first 100k rows and on all 1M "for the same recall". Two bench
runs measure different `ef` points, so this takes, for each recall level,
the best QPS each run reached at that recall or better (one client,
unfiltered), with no interpolation, and the ratio large / small. Given the
output of `scale.py` on the same dataset, it prints the same for one
hnswlib graph, which shows what the data itself imposes.

    python examples/hnswlib/compare_scale.py SMALL/results.json LARGE/results.json [--hnswlib scale.json]
"""

import argparse
import json


def best_qps(points, recall):
    """The highest QPS among points at `recall` or better, or None."""
    qualifying = [p["qps"] for p in points if p["recall"] >= recall]
    return max(qualifying) if qualifying else None


def engine_points(path):
    with open(path) as f:
        results = json.load(f)
    points = [{"qps": p["qps"], "recall": p["recall_at_k"]}
              for p in results["search"] if p["clients"] == 1 and p["filter"] == "unfiltered"]
    return results["rows"], points


def cells(small, large):
    if small is None or large is None:
        return f"{'-':>10} {'-':>10} {'-':>7}"
    return f"{small:>10.0f} {large:>10.0f} {large / small:>7.2f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("small")
    parser.add_argument("large")
    parser.add_argument("--hnswlib")
    parser.add_argument("--recalls", default="0.90,0.93,0.95,0.97,0.98,0.99")
    args = parser.parse_args()
    recalls = [float(r) for r in args.recalls.split(",")]

    systems = []
    (small_rows, small), (large_rows, large) = engine_points(args.small), engine_points(args.large)
    systems.append(("engine", small, large))
    if args.hnswlib:
        with open(args.hnswlib) as f:
            runs = json.load(f)["runs"]
        systems.append(("hnswlib", runs[0]["points"], runs[1]["points"]))

    print(f"best QPS at recall@10 >= r, 1 client: {small_rows} rows against {large_rows} rows")
    print(f"{'system':<10} {'recall':>6} {'QPS small':>10} {'QPS large':>10} {'ratio':>7}")
    for name, small_points, large_points in systems:
        for r in recalls:
            print(f"{name:<10} {r:>6.2f} {cells(best_qps(small_points, r), best_qps(large_points, r))}")


if __name__ == "__main__":
    main()
