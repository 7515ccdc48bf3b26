"""Command line: ``ppcasort demo``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .core.mppca import MixturePPCA
from .core.sorting import OnlineSorter, SortingFactorScore


def _demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    n, n_features, k = 6000, 200, 10
    n_junk = n // 6
    bases = [np.linalg.qr(rng.standard_normal((n_features, k)))[0] for _ in range(3)]
    labels = rng.integers(0, 3, n - n_junk)
    particles = np.einsum("nlk,nk->nl", np.stack(bases)[labels], 5 * rng.standard_normal((n - n_junk, k)))
    data = np.vstack([particles, 5 * rng.standard_normal((n_junk, n_features)) / np.sqrt(n_features / k)])
    data += rng.standard_normal(data.shape)
    is_junk = np.arange(n) >= n - n_junk
    sorter = OnlineSorter(MixturePPCA(3, k, random_state=args.seed), scorer=SortingFactorScore("min"))
    for result in sorter.rounds(data):
        print(f"round {result.round}: kept {result.kept.size} of {n}, log-likelihood {result.log_likelihood[-1]:.2f}")
    purity = 1.0 - is_junk[result.kept].mean()
    print(f"kept {result.kept.size} of {n}; purity {purity:.1%} (raw {1 - is_junk.mean():.1%})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppcasort", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="sort built-in demo data and report the kept set's purity")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
