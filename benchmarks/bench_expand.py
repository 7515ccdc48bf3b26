"""Benchmark basis expansion: throughput at 71 and 128 px, and peak memory on a >4 GB memory-mapped stack.

Usage:
    python3 benchmarks/bench_expand.py [--stack-images 65536] [--skip-memory] [--skip-throughput]

Throughput (images per second, best of 3 after a warm-up) on synthetic particles (a Gaussian blob in
white noise): preprocessing alone (background normalisation, with and without a 2x Fourier crop),
expansion alone (preprocessed images in RAM), and both together through ``expand_particles``.

Memory: writes a float32 stack of ``--stack-images`` x 128 x 128 (65536 images = 4.3 GB) under /tmp with
``mrcfile.new_mmap``, then expands all of it in a fresh subprocess per measurement and reports the peak
resident set size of the expansion alone (VmHWM reset through /proc/self/clear_refs once the basis is
built), split into anonymous memory (RssAnon: arrays the process allocated) and file-backed pages
(RssFile: pages of the memory-mapped stack, and of the output memmap, that are mapped into the process;
the kernel can reclaim them, but they count in RSS). The stack is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_ppcasort.core.bases import PCABasis, PSWFBasis, expand_particles  # noqa: E402
from napari_ppcasort.core.particles import CHUNK_BYTES, open_particles  # noqa: E402
from napari_ppcasort.core.particles import ArrayParticleSet  # noqa: E402
from napari_ppcasort.core.preprocess import Preprocessor  # noqa: E402

MEGABYTE = 2**20


def gaussian_blobs(n_images: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """(n_images, box, box) float32 Gaussian blobs of height 2, random position and width."""
    y, x = np.mgrid[:box, :box] - box // 2
    blobs = np.empty((n_images, box, box), dtype=np.float32)
    for blob, (dx, dy), width in zip(blobs, rng.uniform(-box / 10, box / 10, (n_images, 2)),
                                     rng.uniform(box / 12, box / 6, n_images)):
        blob[:] = 2 * np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * width**2))
    return blobs


def synthetic_particles(n_images: int, box: int, seed: int = 0) -> np.ndarray:
    """(n_images, box, box) float32: a Gaussian blob in unit white noise."""
    rng = np.random.default_rng(seed)
    return gaussian_blobs(n_images, box, rng) + rng.standard_normal((n_images, box, box), dtype=np.float32)


def best_rate(function, n_images: int, repeats: int = 3) -> float:
    """Images per second of the fastest of ``repeats`` calls, after one warm-up call."""
    function()
    best = min(_timed(function) for _ in range(repeats))
    return n_images / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def in_chunks(function, images: np.ndarray) -> None:
    """Apply ``function`` to consecutive chunks of about CHUNK_BYTES, like the streaming code does."""
    step = max(1, CHUNK_BYTES // (4 * images.shape[1] ** 2))
    for start in range(0, len(images), step):
        function(images[start:start + step])


def throughput(n_pca_components: int = 100) -> None:
    rows = []
    for box, n_images in ((71, 4096), (128, 2048)):
        raw = synthetic_particles(n_images, box)
        raw_double = synthetic_particles(n_images // 4, 2 * box, seed=1)
        normalize = Preprocessor(box)
        crop = Preprocessor(2 * box, target_box=box)
        prepared = normalize(raw)
        preprocess_rate = best_rate(lambda: in_chunks(normalize, raw), n_images)
        crop_rate = best_rate(lambda: in_chunks(crop, raw_double), len(raw_double))

        start = time.perf_counter()
        pswf = PSWFBasis(box)
        pswf_build = time.perf_counter() - start
        start = time.perf_counter()
        pca = PCABasis(box, n_components=n_pca_components).fit(prepared)
        pca_build = time.perf_counter() - start
        start = time.perf_counter()
        pca_estimated = PCABasis(box).fit(prepared)
        mp_fit = time.perf_counter() - start

        for name, basis, build in (("PSWF", pswf, pswf_build), ("PCA", pca, pca_build)):
            expand_rate = best_rate(lambda: in_chunks(basis.expand, prepared), n_images)
            together_rate = best_rate(lambda: expand_particles(ArrayParticleSet(raw), basis, normalize), n_images)
            rows.append((box, name, basis.n_pixels, basis.n_coefficients, build, preprocess_rate, crop_rate,
                         expand_rate, together_rate))
        print(f"  {box} px: PCA with the Marchenko-Pastur estimate on {n_images} synthetic images: "
              f"{pca_estimated.n_coefficients} components, noise variance {pca_estimated.noise_variance_:.3f}, "
              f"fit {mp_fit:.1f} s", flush=True)

    print()
    print("Throughput, images per second (best of 3; synthetic particles; "
          f"{os.cpu_count()} CPUs; PCA with {n_pca_components} components, fitted on the same images)")
    header = ("box", "basis", "pixels", "L", "build s", "normalise", "crop 2x+norm", "expand", "norm+expand")
    print("  " + " | ".join(f"{h:>12}" for h in header))
    for box, name, pixels, n_coefficients, build, pre, crop_rate, expand_rate, together in rows:
        values = (box, name, pixels, n_coefficients, f"{build:.1f}", f"{pre:.0f}", f"{crop_rate:.0f}",
                  f"{expand_rate:.0f}", f"{together:.0f}")
        print("  " + " | ".join(f"{v:>12}" for v in values))
    print("  (crop 2x+norm: input images of twice the box, Fourier-cropped to the box then normalised)")


# -- memory ------------------------------------------------------------------------------------------------


def write_stack(path: Path, n_images: int, box: int = 128) -> None:
    """Write an (n_images, box, box) float32 .mrcs stack in chunks through mrcfile.new_mmap.

    Every image has its own noise; the blobs repeat every 1024 images (in a different order each time).
    """
    rng = np.random.default_rng(3)
    blobs = gaussian_blobs(1024, box, rng)
    with mrcfile.new_mmap(path, shape=(n_images, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        for start in range(0, n_images, len(blobs)):
            stop = min(start + len(blobs), n_images)
            block = rng.standard_normal((stop - start, box, box), dtype=np.float32)
            block += blobs[rng.permutation(len(blobs))[:stop - start]]
            mrc.data[start:stop] = block
            mrc.flush()


def _status() -> dict[str, int]:
    """Selected /proc/self/status fields in kB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def child(case: str, stack: Path, out_dir: Path) -> None:
    """One memory measurement (run in its own process); prints a JSON line."""
    preprocessor = Preprocessor(128, target_box=64) if case.endswith("pswf64") else Preprocessor(128)
    particles = open_particles(stack) if case.startswith("particleset") else ArrayParticleSet(
        mrcfile.mmap(stack, mode="r").data)
    if case.endswith("pswf64"):
        basis = PSWFBasis(64)
    else:
        sample = np.sort(np.random.default_rng(0).choice(particles.n_particles, 2000, replace=False))
        basis = PCABasis(128).fit(preprocessor(next(particles.iter_chunks(sample, len(sample)))[1]))
    out = np.lib.format.open_memmap(out_dir / f"{case}.npy", mode="w+", dtype=np.float32,
                                    shape=(particles.n_particles, basis.n_coefficients))
    before = _status()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS

    peaks = {"RssAnon": 0, "RssFile": 0}
    running = True

    def sample_rss():
        while running:
            now = _status()
            for key in peaks:
                peaks[key] = max(peaks[key], now[key])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    start = time.perf_counter()
    expand_particles(particles, basis, preprocessor, out=out)
    out.flush()
    elapsed = time.perf_counter() - start
    running = False
    sampler.join()
    after = _status()
    print(json.dumps({"case": case, "n_coefficients": basis.n_coefficients, "seconds": elapsed,
                      "rate": particles.n_particles / elapsed, "rss_before_kb": before["VmRSS"],
                      "peak_kb": after["VmHWM"], "peak_anon_kb": peaks["RssAnon"], "peak_file_kb": peaks["RssFile"],
                      "output_bytes": out.nbytes}))


CASES = {
    "particleset_pca": "ParticleSet (open_particles, mrcfile.mmap) -> normalise -> PCA (MP estimate, 2000-image fit)",
    "array_pca": "ArrayParticleSet(mrcfile.mmap(stack).data), pages unmapped per chunk -> normalise -> PCA",
    "particleset_pswf64": "ParticleSet -> Fourier crop 128->64 + normalise -> PSWF(64)",
    "array_pswf64": "ArrayParticleSet(mrcfile.mmap(stack).data) -> Fourier crop 128->64 + normalise -> PSWF(64)",
}


def memory(n_images: int) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="bench_expand_") as folder:
        folder = Path(folder)
        stack = folder / "stack.mrcs"
        start = time.perf_counter()
        write_stack(stack, n_images)
        size = stack.stat().st_size
        print(f"\nWrote {stack} ({n_images} x 128 x 128 float32, {size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        results = []
        for case in CASES:
            completed = subprocess.run([sys.executable, __file__, "--child", case, str(stack), str(folder)],
                                       capture_output=True, text=True)
            if completed.returncode != 0:
                print(f"  {case} failed:\n{completed.stderr}", flush=True)
                continue
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            (folder / f"{case}.npy").unlink()
            print(f"  done: {case}", flush=True)

    print(f"\nPeak memory while expanding the whole {size / 2**30:.2f} GiB stack (one subprocess per row; "
          "output written to a .npy memmap on disk; MiB)")
    header = ("case", "L", "img/s", "RSS before", "peak RSS", "peak anon", "peak file", "output")
    print(f"  {header[0]:<18} " + " | ".join(f"{h:>10}" for h in header[1:]))
    for result in results:
        values = (result["n_coefficients"], f"{result['rate']:.0f}", f"{result['rss_before_kb'] / 1024:.0f}",
                  f"{result['peak_kb'] / 1024:.0f}", f"{result['peak_anon_kb'] / 1024:.0f}",
                  f"{result['peak_file_kb'] / 1024:.0f}", f"{result['output_bytes'] / MEGABYTE:.0f}")
        print(f"  {result['case']:<18} " + " | ".join(f"{v:>10}" for v in values))
    for case, description in CASES.items():
        print(f"  {case}: {description}")
    print("  peak RSS: VmHWM of the expansion alone (reset after building the basis), includes the output "
          "memmap's dirty pages and the stack's mapped pages; peak anon/file: RssAnon/RssFile sampled every 20 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack-images", type=int, default=65536, help="images of 128 px in the memory test stack")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "STACK", "FOLDER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        case, stack, folder = arguments.child
        child(case, Path(stack), Path(folder))
        return
    if not arguments.skip_throughput:
        throughput()
    if not arguments.skip_memory:
        memory(arguments.stack_images)


if __name__ == "__main__":
    main()
