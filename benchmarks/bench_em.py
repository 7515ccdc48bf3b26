"""Time and memory of one EM iteration of MixturePPCA, against one float64 matrix product of the same shapes.

For each N in {10000, 50000}, L in {300, 1000}, M in {1, 3} with M*K = 60, a fresh subprocess builds float32
data (N, L), initialises the model and times EM iterations; in the same process it times one float64 product
(N x L) @ (L x 60). The ratio (EM iteration / product) is the figure of merit: target <= 4.
Peak memory is the process's high-water mark (VmHWM) above what it held once the data existed.

    python benchmarks/bench_em.py            # the whole grid
    python benchmarks/bench_em.py --quick    # N = 10000 only

The default model (``--default``): one EM iteration of the contamination model (M = 3 particle classes of
K = 20, their outlier twins, the empty box, J = 3 backgrounds) on N coefficients of the default PSWF basis
(64 px, L = 299), at 1 and at 2 BLAS threads (``OPENBLAS_NUM_THREADS``, a fresh process each), against its
GEMMs: the projections of the coefficients on all subspace axes, (N x L) @ (L x MK), and the block second
moments of its statistics, one (2s x N) @ (N x 2s) product per angular block of size s and statistics
component (M + J), on float64 data already laid out block by block. Target: ratio <= 3.

    python benchmarks/bench_em.py --default [--n 60000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TOTAL_DIM = 60


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


def _best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, n_features: int, n_components: int) -> dict:
    from napari_ppcasort.core.mppca import MixturePPCA

    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, n_features), dtype=np.float32)
    data[:, :TOTAL_DIM] *= 5  # some structure, so EM has something to find
    dense = np.asarray(data, dtype=np.float64)
    right = rng.standard_normal((n_features, TOTAL_DIM))
    product_time = _best_time(lambda d=dense: d @ right, repeats=5)
    del dense

    model = MixturePPCA(n_components, TOTAL_DIM // n_components, random_state=0)
    model.initialize(data)
    model.step(data)  # warm-up
    baseline = _vm_kib("VmRSS")
    _reset_peak()
    iteration_time = _best_time(lambda: model.step(data), repeats=3)
    peak = _vm_kib("VmHWM") - baseline
    return {
        "N": n,
        "L": n_features,
        "M": n_components,
        "K": TOTAL_DIM // n_components,
        "iteration_s": iteration_time,
        "product_s": product_time,
        "ratio": iteration_time / product_time,
        "peak_extra_MiB": peak / 1024,
        "data_MiB": data.nbytes / 2**20,
    }


def measure_default(n: int) -> dict:
    """One EM iteration of the default model on (n, 299) coefficients against its GEMMs (module docstring)."""
    from napari_ppcasort import SortSettings
    from napari_ppcasort.core.bases import PSWFBasis
    from napari_ppcasort.core.pipeline import make_sorter

    basis = PSWFBasis(64, radius=19.34, max_coefficients=300)  # the default basis of a 64 px stack
    model = make_sorter(SortSettings(), basis).model
    layout = model.layout
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, basis.n_coefficients), dtype=np.float32)
    data[:, : TOTAL_DIM] *= 3
    model.initialize(data)
    model.step(data)  # warm-up
    components = model.n_components + model.n_background  # the components with block statistics
    # the GEMM floor: projections on all axes, and the block second moments of every statistics component
    dense = np.asarray(data, dtype=np.float64)
    axes = model.axes_.reshape(-1, basis.n_coefficients).T.copy()
    # (g, n, 2s): the [cos | sin] columns of each block of a size group, block by block
    groups = [np.ascontiguousarray(np.concatenate([dense[:, cos], dense[:, sin]], axis=2).transpose(1, 0, 2))
              for cos, sin in layout.size_groups]
    zero = np.ascontiguousarray(dense[:, layout.zero_columns])

    def gemms():
        dense @ axes
        for _ in range(components):
            zero.T @ zero
            for blocks in groups:
                np.matmul(blocks.transpose(0, 2, 1), blocks)

    gemm_time = _best_time(gemms, repeats=3)
    del dense, groups, zero
    iteration_time = _best_time(lambda: model.step(data), repeats=3)
    return {"N": n, "L": basis.n_coefficients, "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "iteration_s": iteration_time, "gemms_s": gemm_time, "ratio": iteration_time / gemm_time}


def main_default(n: int) -> None:
    print(f"default model, N = {n}: {'threads':>7} {'EM iter (s)':>11} {'GEMMs (s)':>9} {'ratio':>6}")
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, __file__, "--one-default", str(n)], check=True, capture_output=True,
                             text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{'':>26} {r['threads']:>7} {r['iteration_s']:>11.3f} {r['gemms_s']:>9.3f} {r['ratio']:>6.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 10000 only")
    parser.add_argument("--default", action="store_true", help="the default model at 1 and 2 threads")
    parser.add_argument("--n", type=int, default=60000, help="images for --default [60000]")
    parser.add_argument("--one", nargs=3, type=int, metavar=("N", "L", "M"), help=argparse.SUPPRESS)
    parser.add_argument("--one-default", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    if args.one_default:
        print(json.dumps(measure_default(args.one_default)))
        return
    if args.default:
        main_default(args.n)
        return
    sizes = [10000] if args.quick else [10000, 50000]
    print(f"{'N':>6} {'L':>5} {'M':>2} {'K':>3} {'EM iter (s)':>11} {'product (s)':>11} {'ratio':>6} "
          f"{'peak extra (MiB)':>16} {'data (MiB)':>10}")
    for n in sizes:
        for n_features in (300, 1000):
            for n_components in (1, 3):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", str(n), str(n_features), str(n_components)],
                    check=True, capture_output=True, text=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{r['N']:>6} {r['L']:>5} {r['M']:>2} {r['K']:>3} {r['iteration_s']:>11.3f} "
                      f"{r['product_s']:>11.3f} {r['ratio']:>6.2f} {r['peak_extra_MiB']:>16.1f} {r['data_MiB']:>10.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
