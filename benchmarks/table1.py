"""The paper's Table 1 (section 4.1), reproduced: composition of the kept set after online sorting.

Data: 50,000 projections of the 70S ribosome (../shared/data/aspire_70s_ribosome_vol65, resampled to 71 px)
at uniformly random orientations with small random shifts, SNR 1/10, plus 8.33% outliers (energy-matched
random crops of the cameraman picture) and 8.33% pure-noise images; K_total = 60, alpha = 5%, P = 6, 5 rounds.
Methods: the paper's sorting factor with 1, 2 and 3 subspaces, the sPCA baseline (top K_total principal
components, keep the highest retained-energy ratio), the product's default (SortSettings(): the contamination
model, which decides itself how much to remove; core/contamination.py), the rotation-closed mixture scored by
the evidence for each class's rotational average on the Table 1 schedule (core/steerable.py), and whatever
variants are asked for with --variants. Every method runs through the product's pipeline (prepare_coefficients, make_sorter):
images cropped to 64 px, 300 low-pass PSWF functions unless a variant says otherwise. Times are wall-clock seconds of the sort alone (the basis expansion is printed once per
basis) and, in brackets, CPU seconds of this process.

    python benchmarks/table1.py             # full size: 60,000 images
    python benchmarks/table1.py --quick     # 6,000 images, under two minutes
    python benchmarks/table1.py --quick --variants all
    python benchmarks/table1.py --quick --snr 0.077 --junk-fraction 0.1 --variants steerable
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_ppcasort.core.pipeline import SortSettings, make_sorter, prepare_coefficients
from napari_ppcasort.core.particles import ArrayParticleSet
from napari_ppcasort.core.simulate import NOISE, OUTLIER, PARTICLE, load_volume, simulate_particles
from napari_ppcasort.core.sorting import SortingFactorScore
from napari_ppcasort.core.steerable import MeanEvidenceScore, mean_evidence

RIBOSOME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aspire_70s_ribosome_vol65" / "clean70SRibosome_vol_65p.mrc"

PAPER = {  # Table 1 of the paper: % particles, % outliers, % noise in the kept set
    "raw": (83.33, 8.33, 8.33),
    "paper M=1": (87.89, 3.38, 8.73),
    "paper M=2": (89.25, 3.95, 6.8),
    "paper M=3": (91.04, 2.9, 6.06),
    "sPCA": (90.1, 9.6, 0.84),
}

#: The paper's method: its mixture of PPCA and sorting factor (summed over subspaces, uncentred), in the
#: product's PSWF basis (300 low-pass functions of the image cropped to 64 px).
PAPER_SETTINGS = dict(model="paper", basis="pswf", combine="sum", center=False, total_dimension=60, alpha=0.05,
                      iterations_per_round=6, stop="schedule", n_rounds=5)
#: The Table 1 schedule (5 rounds of 5%) for the steerable model and its variants.
SCHEDULE = dict(stop="schedule", n_rounds=5, alpha=0.05)

#: Extra methods: name -> settings overrides on top of PAPER_SETTINGS.
VARIANTS = {
    "pswf800 M=3 sum": dict(n_subspaces=3, n_coefficients=800),
    "pca300 M=3 sum": dict(basis="pca", n_subspaces=3, n_coefficients=300),
    "pca800 M=3 sum": dict(basis="pca", n_subspaces=3, n_coefficients=800),
    "pca300 M=1 sum": dict(basis="pca", n_subspaces=1, n_coefficients=300),
    "pca M=1 sum": dict(basis="pca", n_subspaces=1, n_coefficients=None),
    "pca M=3 sum": dict(basis="pca", n_subspaces=3, n_coefficients=None),
    "pswf M=3 min": dict(n_subspaces=3, combine="min"),
    "pswf M=3 min centred": dict(n_subspaces=3, combine="min", center=True),
    "pswf M=3 resp": dict(n_subspaces=3, combine="responsibility"),
    "pswf M=3 sum centred": dict(n_subspaces=3, center=True),
    "pca M=3 min": dict(basis="pca", n_subspaces=3, combine="min"),
    "pca M=3 resp": dict(basis="pca", n_subspaces=3, combine="responsibility"),
    "pca M=3 sum centred": dict(basis="pca", n_subspaces=3, center=True),
}

#: The product's default: SortSettings() (the contamination model: rotation-closed particle subspaces, M = 3,
#: K_total = 60, plus junk components; it decides how much to remove, core/contamination.py), and the
#: rotation-closed mixture alone scored by the mean evidence (core/steerable.py) on the Table 1 schedule.
PROPOSED = {"contamination M=3 (default)": {}, "steerable M=3": dict(model="steerable", **SCHEDULE)}

#: Variants of the proposed method: SortSettings overrides, and 'score' to swap the junk score for an ablation
#: ('class evidence': the own-class term of the mean evidence alone; 'sum': the paper's sorting factor;
#: 'evidence': the mean evidence on the paper's model). --variants steerable runs them all.
STEERABLE_VARIANTS = {
    "steerable M=1": dict(model="steerable", **SCHEDULE, n_subspaces=1),
    "steerable M=2": dict(model="steerable", **SCHEDULE, n_subspaces=2),
    "steerable M=4": dict(model="steerable", **SCHEDULE, n_subspaces=4),
    "steerable M=3 K=120": dict(model="steerable", **SCHEDULE, total_dimension=120),
    "steerable M=3 per-comp noise": dict(model="steerable", **SCHEDULE, noise="per_component"),
    "steerable M=3 L=180": dict(model="steerable", **SCHEDULE, n_coefficients=180),
    "steerable M=3 L=500": dict(model="steerable", **SCHEDULE, n_coefficients=500),
    "steerable M=3 71 px": dict(model="steerable", **SCHEDULE, box_size=None),
    "steerable M=3 SF sum": dict(model="steerable", **SCHEDULE, score="sum"),
    "steerable M=3 class evidence": dict(model="steerable", **SCHEDULE, score="class evidence"),
    # the paper's unconstrained model in the same basis, scored by the mean evidence
    "paper-model M=3 evidence": dict(model="paper", **SCHEDULE, score="evidence"),
    "paper-model M=1 evidence": dict(model="paper", **SCHEDULE, n_subspaces=1, score="evidence"),
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


def class_evidence_score(model, data) -> np.ndarray:
    """The own-class term of MeanEvidenceScore alone (an ablation): minus the responsibility-weighted evidences."""
    return -np.einsum("im,im->i", model.predict_proba(data), mean_evidence(model.parameters(), data))


ABLATION_SCORES = {"evidence": MeanEvidenceScore(), "class evidence": class_evidence_score, "sum": SortingFactorScore("sum")}


def run_method(name, coefficients, labels, sorter):
    start, cpu_start = time.perf_counter(), time.process_time()
    for result in sorter.rounds(coefficients):
        pass
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    junk = labels != PARTICLE
    return {
        "name": name,
        "rounds": result.round,
        "recall": float(np.mean(np.isin(np.flatnonzero(~junk), result.kept))),
        "composition": composition(labels[result.kept]),
        "auc": roc_auc(result.final_scores, junk),
        "auc_outliers": roc_auc(result.final_scores[labels != NOISE], labels[labels != NOISE] == OUTLIER),
        "auc_noise": roc_auc(result.final_scores[labels != OUTLIER], labels[labels != OUTLIER] == NOISE),
        "kept": result.kept.size,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6,000 images instead of 60,000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--junk-fraction", type=float, default=1 / 12,
                        help="fraction of outliers, and again of pure-noise images (paper: 8.33%%)")
    parser.add_argument("--outlier-threshold", type=float, default=None, metavar="T",
                        help="run every method in the automatic mode with this threshold (no fixed number of rounds)")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="extra methods by name, 'all' (the paper's settings), 'steerable' (the proposed model's)")
    args = parser.parse_args(argv)
    paper_methods = [(f"paper M={m}", dict(n_subspaces=m)) for m in (1, 2, 3)]
    steerable_methods = list(PROPOSED.items())
    for name in args.variants:
        if name == "all":
            paper_methods += list(VARIANTS.items())
        elif name == "steerable":
            steerable_methods += list(STEERABLE_VARIANTS.items())
        elif name in VARIANTS:
            paper_methods.append((name, VARIANTS[name]))
        elif name in STEERABLE_VARIANTS:
            steerable_methods.append((name, STEERABLE_VARIANTS[name]))
        else:
            parser.error(f"unknown variant {name!r}; known: all, steerable, {', '.join([*VARIANTS, *STEERABLE_VARIANTS])}")
    n_particles = 5000 if args.quick else 50000
    n_junk = int(round(n_particles * args.junk_fraction / (1 - 2 * args.junk_fraction)))

    t0 = time.perf_counter()
    volume = load_volume(RIBOSOME, 71)
    stack = simulate_particles(n_particles, n_outliers=n_junk, n_noise=n_junk, box_size=71, volume=volume,
                               snr=args.snr, max_shift=2.0, random_state=args.seed)
    labels = stack.labels
    t_sim = time.perf_counter() - t0
    print(f"simulated {labels.size} images (71 px, SNR {args.snr:g}) in {t_sim:.1f} s", flush=True)

    particles = ArrayParticleSet(stack.images)
    prepared = {}

    def prepared_for(settings: SortSettings):
        """The coefficients (and basis) of the stack for ``settings``, computed once per basis."""
        key = (settings.basis, settings.n_coefficients, settings.box_size)
        if key not in prepared:
            t0, cpu0 = time.perf_counter(), time.process_time()
            prepared[key] = prepare_coefficients(particles, settings)
            print(f"{settings.basis.upper()} basis ({settings.box_size or 71} px): "
                  f"{prepared[key].coefficients.shape[1]} coefficients per image, basis and expansion "
                  f"{time.perf_counter() - t0:.1f} s (CPU {time.process_time() - cpu0:.1f} s)", flush=True)
        return prepared[key]

    def run(name, settings: SortSettings, score: str | None = None):
        coefficients = prepared_for(settings)
        sorter = make_sorter(settings, coefficients.basis)
        if score is not None:
            sorter.scorer = ABLATION_SCORES[score]
        rows.append(run_method(name, coefficients.coefficients, labels, sorter))
        print_row(rows[-1], flush=True)

    common = {"random_state": args.seed}
    # --outlier-threshold: every method in the automatic mode instead of the Table 1 schedule
    automatic = {} if args.outlier_threshold is None else dict(outlier_threshold=args.outlier_threshold,
                                                                 stop="junk-left", n_rounds=None)
    rows = []
    for name, overrides in paper_methods:
        run(name, SortSettings(**{**PAPER_SETTINGS, **common, **overrides, **automatic}))
    for name, overrides in steerable_methods:
        overrides = dict(overrides)
        score = overrides.pop("score", None)
        run(name, SortSettings(**{**common, **overrides, **automatic}), score)

    n_keep = rows[0]["kept"]
    t0 = time.perf_counter()
    kept, score = spca_baseline(prepared_for(SortSettings(**PAPER_SETTINGS)).coefficients, 60, n_keep)
    rows.append({"name": "sPCA", "composition": composition(labels[kept]), "auc": roc_auc(score, labels != PARTICLE),
                 "auc_outliers": roc_auc(score[labels != NOISE], labels[labels != NOISE] == OUTLIER),
                 "auc_noise": roc_auc(score[labels != OUTLIER], labels[labels != OUTLIER] == NOISE),
                 "kept": kept.size, "seconds": time.perf_counter() - t0, "cpu_seconds": float("nan")})
    print_row(rows[-1], flush=True)
    print()
    print_table(rows, labels)


def print_row(row, **kwargs):
    p, o, n = row["composition"]
    print(f"  {row['name']:<28} particles {p:6.2f}%  outliers {o:5.2f}%  noise {n:5.2f}%  "
          f"AUC {row['auc']:.4f} (outliers {row['auc_outliers']:.4f}, noise {row['auc_noise']:.4f})  "
          f"kept {row['kept']} (particle recall {row.get('recall', float('nan')):.2%}, {row.get('rounds', '-')} rounds)  "
          f"{row['seconds']:.1f} s (CPU {row['cpu_seconds']:.1f} s)", **kwargs)


def print_table(rows, labels):
    header = (f"| {'method':<28} | {'% particles':>11} | {'% outliers':>10} | {'% noise':>7} | {'ROC AUC':>7} | "
              f"{'AUC outl.':>9} | {'AUC noise':>9} | {'kept':>6} | {'time (s)':>8} | {'CPU (s)':>7} | paper (% p / o / n) |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    nan = float("nan")
    raw = {"name": "raw", "composition": composition(labels), "auc": nan, "auc_outliers": nan, "auc_noise": nan,
           "kept": labels.size, "seconds": 0.0, "cpu_seconds": 0.0}
    for row in [raw, *rows]:
        p, o, n = row["composition"]
        paper = PAPER.get(row["name"])
        paper_text = " / ".join(f"{v:.2f}" for v in paper) if paper else ""
        print(f"| {row['name']:<28} | {p:>11.2f} | {o:>10.2f} | {n:>7.2f} | {row['auc']:>7.4f} | "
              f"{row['auc_outliers']:>9.4f} | {row['auc_noise']:>9.4f} | {row['kept']:>6} | {row['seconds']:>8.1f} | "
              f"{row['cpu_seconds']:>7.1f} | {paper_text:<19} |")


if __name__ == "__main__":
    sys.exit(main())
