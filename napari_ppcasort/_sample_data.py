"""npe2 sample data: a small simulated particle stack with known junk, to try the plugin without data.

2000 images of 32 x 32 pixels (seeded, identical on every call): 1600 projections of the built-in 3-D
phantom at random orientations, 200 "outliers" (crops of an ordinary photograph, energy-matched) and
200 pure-noise boxes, all with white noise at SNR 0.3 (definition in core.simulate.simulate_particles).
The ground truth is in the layer metadata and in the ``ppcasortTrueLabel`` column of the particle table,
so an exported STAR file carries it too.
"""

from __future__ import annotations

import numpy as np

from ._reader import ParticleStack, stack_layer_kwargs
from .core.particles import ArrayParticleSet
from .core.simulate import LABEL_NAMES, simulate_particles

__all__ = ["SAMPLE_NAME", "make_sample_data", "simulated_sample"]

SAMPLE_NAME = "simulated particles"
SAMPLE_COUNTS = {"n_particles": 1600, "n_outliers": 200, "n_noise": 200}
SAMPLE_BOX = 32
SAMPLE_SNR = 0.3
SAMPLE_SEED = 0


def simulated_sample() -> ParticleStack:
    """The sample stack, (2000, 32, 32) float32, over an in-memory particle set with the true labels."""
    simulated = simulate_particles(**SAMPLE_COUNTS, box_size=SAMPLE_BOX, snr=SAMPLE_SNR, random_state=SAMPLE_SEED)
    particles = ArrayParticleSet(simulated.images, SAMPLE_NAME, columns={"ppcasortTrueLabel": simulated.labels},
                                    pixel_size=simulated.pixel_size)
    return ParticleStack(particles)


def make_sample_data() -> list[tuple]:
    """npe2 sample-data command: one image layer; metadata ``labels`` ((N,) int8 codes) and ``label_names``."""
    stack = simulated_sample()
    labels = stack.particles.table["ppcasortTrueLabel"].to_numpy(np.int8)
    metadata = {"labels": labels, "label_names": dict(LABEL_NAMES), "snr": SAMPLE_SNR}
    return [(stack, stack_layer_kwargs(stack, SAMPLE_NAME, metadata), "image")]
