"""Local intrinsic dimension of a dataset's base vectors.

The Levina-Bickel maximum-likelihood estimate from each sampled point's 20
nearest neighbours (by cosine, over the first `--rows` rows), median over
the sample; and how many principal components hold 50 / 80 / 90 % of the
variance. A graph index's cost at a fixed recall grows with the rows much
faster on data of high local intrinsic dimension, which is why
`vectorflow dataset synth --latent-dim` exists.

    python examples/hnswlib/intrinsic_dim.py DATASET_DIR [DATASET_DIR ...]

DATASET_DIR is a folder in the layout of shared/datasets (base.npy as
float16 unit vectors). Measured on this machine: pypi-100k 22.3;
`dataset synth --dim 128` 46.7; `dataset synth --dim 128 --latent-dim 24`
about 19.
"""

import argparse

import numpy as np


def intrinsic_dimension(base, sample, neighbours, seed=0):
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(base), sample, replace=False)
    nearest = np.empty((sample, neighbours), dtype=np.float32)
    # 100 sampled points at a time: the whole sample against every row would hold sample x rows distances.
    for start in range(0, sample, 100):
        rows = picked[start:start + 100]
        squared = np.maximum(2 - 2 * (base[rows] @ base.T), 0)
        squared[np.arange(len(rows)), rows] = np.inf
        nearest[start:start + 100] = np.sort(np.partition(squared, neighbours, axis=1)[:, :neighbours], axis=1)
    distances = np.sqrt(np.maximum(nearest, 1e-12))
    estimates = (neighbours - 1) / np.sum(np.log(distances[:, -1:] / distances[:, :-1]), axis=1)
    return float(np.median(estimates))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--neighbours", type=int, default=20)
    args = parser.parse_args()
    for path in args.datasets:
        base = np.load(f"{path}/base.npy")[:args.rows].astype(np.float32)
        centred = base[:20_000] - base[:20_000].mean(axis=0)
        spectrum = np.linalg.eigvalsh(centred.T @ centred)[::-1]
        share = np.cumsum(spectrum / spectrum.sum())
        components = [int(np.searchsorted(share, t)) + 1 for t in (0.5, 0.8, 0.9)]
        lid = intrinsic_dimension(base, args.sample, args.neighbours)
        print(f"{path}: dim {base.shape[1]}, local intrinsic dimension {lid:.1f}, "
              f"principal components for 50/80/90 % of the variance {components}")


if __name__ == "__main__":
    main()
