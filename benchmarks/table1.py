"""The paper's Table 1 (section 4.1), reproduced: composition of the kept set after online sorting.

Data: 50,000 projections of the 70S ribosome (../shared/data/aspire_70s_ribosome_vol65, resampled to 71 px)
at uniformly random orientations with small random shifts, SNR 1/10, plus 8.33% outliers (energy-matched
random crops of the cameraman picture) and 8.33% pure-noise images; K_total = 60, alpha = 5%, P = 6, 5 rounds.
Methods: the paper's sorting factor with 1, 2 and 3 subspaces, the sPCA baseline (top K_total principal
components, keep the highest retained-energy ratio), and whatever variants are asked for with --variants.

    python benchmarks/table1.py             # full size: 60,000 images
    python benchmarks/table1.py --quick     # 6,000 images, under two minutes
    python benchmarks/table1.py --quick --variants all
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_ppcasort.core.pipeline import SortSettings, make_sorter, prepare_coefficients
from napari_ppcasort.core.preprocess import ArrayParticles
from napari_ppcasort.core.simulate import NOISE, OUTLIER, PARTICLE, load_volume, simulate_particles

RIBOSOME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aspire_70s_ribosome_vol65" / "clean70SRibosome_vol_65p.mrc"

PAPER = {  # Table 1 of the paper: % particles, % outliers, % noise in the kept set
    "raw": (83.33, 8.33, 8.33),
    "paper M=1": (87.89, 3.38, 8.73),
    "paper M=2": (89.25, 3.95, 6.8),
    "paper M=3": (91.04, 2.9, 6.06),
    "sPCA": (90.1, 9.6, 0.84),
}

#: The paper's method: sorting factor summed over subspaces, uncentred, PSWF basis.
PAPER_SETTINGS = dict(basis="pswf", combine="sum", center=False, total_dimension=60, alpha=0.05,
                      iterations_per_round=6, n_rounds=5)

#: Extra methods: name -> settings overrides on top of PAPER_SETTINGS.
VARIANTS = {
    "pswf300 M=3 sum": dict(n_subspaces=3, n_coefficients=300),
    "pswf800 M=3 sum": dict(n_subspaces=3, n_coefficients=800),
    "pca300 M=3 sum": dict(basis="pca", n_subspaces=3, n_coefficients=300),
    "pca800 M=3 sum": dict(basis="pca", n_subspaces=3, n_coefficients=800),
    "pca300 M=1 sum": dict(basis="pca", n_subspaces=1, n_coefficients=300),
    "pca M=1 sum": dict(basis="pca", n_subspaces=1),
    "pca M=3 sum": dict(basis="pca", n_subspaces=3),
    "pswf M=3 min": dict(n_subspaces=3, combine="min"),
    "pswf M=3 min centred": dict(n_subspaces=3, combine="min", center=True),
    "pswf M=3 resp": dict(n_subspaces=3, combine="responsibility"),
    "pswf M=3 sum centred": dict(n_subspaces=3, center=True),
    "pca M=3 min": dict(basis="pca", n_subspaces=3, combine="min"),
    "pca M=3 resp": dict(basis="pca", n_subspaces=3, combine="responsibility"),
    "pca M=3 sum centred": dict(basis="pca", n_subspaces=3, center=True),
}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` (junk) from the rest (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def composition(labels: np.ndarray) -> tuple[float, float, float]:
    return tuple(100.0 * float(np.mean(labels == code)) for code in (PARTICLE, OUTLIER, NOISE))


def spca_baseline(coefficients: np.ndarray, total_dimension: int, n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's sPCA sorting: project on the top principal components, keep the highest energy ratio.

    Returns (kept indices, junk score = 1 - retained energy ratio)."""
    rows = np.asarray(coefficients, dtype=np.float64)
    second_moment = rows.T @ rows / rows.shape[0]
    _, vectors = np.linalg.eigh(second_moment)
    top = vectors[:, -total_dimension:]
    retained = np.einsum("ij,ij->i", rows @ top, rows @ top) / np.einsum("ij,ij->i", rows, rows)
    score = 1.0 - retained
    return np.sort(np.argsort(score, kind="stable")[:n_keep]), score


def run_method(name, coefficients, labels, settings):
    start = time.perf_counter()
    sorter = make_sorter(settings)
    for result in sorter.rounds(coefficients):
        pass
    seconds = time.perf_counter() - start
    junk = labels != PARTICLE
    return {
        "name": name,
        "composition": composition(labels[result.kept]),
        "auc": roc_auc(result.final_scores, junk),
        "kept": result.kept.size,
        "seconds": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6,000 images instead of 60,000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--junk-fraction", type=float, default=1 / 12,
                        help="fraction of outliers, and again of pure-noise images (paper: 8.33%%)")
    parser.add_argument("--variants", nargs="*", default=[], help="extra methods by name, or 'all'")
    args = parser.parse_args(argv)
    n_particles = 5000 if args.quick else 50000
    n_junk = int(round(n_particles * args.junk_fraction / (1 - 2 * args.junk_fraction)))

    t0 = time.perf_counter()
    volume = load_volume(RIBOSOME, 71)
    stack = simulate_particles(n_particles, n_outliers=n_junk, n_noise=n_junk, box_size=71, volume=volume,
                               snr=args.snr, max_shift=2.0, random_state=args.seed)
    labels = stack.labels
    t_sim = time.perf_counter() - t0
    print(f"simulated {labels.size} images (71 px, SNR {args.snr:g}) in {t_sim:.1f} s", flush=True)

    particles = ArrayParticles(stack.images)
    coefficients = {}

    def coefficients_for(settings: SortSettings) -> np.ndarray:
        key = (settings.basis, settings.n_coefficients)
        if key not in coefficients:
            t0 = time.perf_counter()
            coefficients[key] = prepare_coefficients(particles, settings).coefficients
            print(f"{settings.basis.upper()} basis: {coefficients[key].shape[1]} coefficients per image, "
                  f"expansion {time.perf_counter() - t0:.1f} s", flush=True)
        return coefficients[key]

    methods = [(f"paper M={m}", dict(n_subspaces=m)) for m in (1, 2, 3)]
    names = list(VARIANTS) if args.variants == ["all"] else args.variants
    methods += [(name, VARIANTS[name]) for name in names]
    rows = []
    for name, overrides in methods:
        settings = SortSettings(**{**PAPER_SETTINGS, "random_state": args.seed, **overrides})
        rows.append(run_method(name, coefficients_for(settings), labels, settings))
        print_row(rows[-1], flush=True)

    n_keep = rows[0]["kept"]
    t0 = time.perf_counter()
    kept, score = spca_baseline(coefficients_for(SortSettings(**PAPER_SETTINGS)), 60, n_keep)
    rows.append({"name": "sPCA", "composition": composition(labels[kept]), "auc": roc_auc(score, labels != PARTICLE),
                 "kept": kept.size, "seconds": time.perf_counter() - t0})
    print_row(rows[-1], flush=True)
    print()
    print_table(rows, labels)


def print_row(row, **kwargs):
    p, o, n = row["composition"]
    print(f"  {row['name']:<24} particles {p:6.2f}%  outliers {o:5.2f}%  noise {n:5.2f}%  "
          f"AUC {row['auc']:.3f}  kept {row['kept']}  {row['seconds']:.1f} s", **kwargs)


def print_table(rows, labels):
    header = f"| {'method':<24} | {'% particles':>11} | {'% outliers':>10} | {'% noise':>7} | {'ROC AUC':>7} | {'kept':>6} | {'time (s)':>8} | paper (% p / o / n) |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    raw = {"name": "raw", "composition": composition(labels), "auc": float("nan"), "kept": labels.size, "seconds": 0.0}
    for row in [raw, *rows]:
        p, o, n = row["composition"]
        paper = PAPER.get(row["name"])
        paper_text = " / ".join(f"{v:.2f}" for v in paper) if paper else ""
        print(f"| {row['name']:<24} | {p:>11.2f} | {o:>10.2f} | {n:>7.2f} | {row['auc']:>7.3f} | {row['kept']:>6} | "
              f"{row['seconds']:>8.1f} | {paper_text:<19} |")


if __name__ == "__main__":
    sys.exit(main())
