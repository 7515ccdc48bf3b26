"""Tests of the napari reader (lazy particle stacks), the in-memory particle set and the sample data."""

import warnings

import mrcfile
import numpy as np
import pytest

from napari_ppcasort._reader import (
    ParticleStack,
    get_reader,
    read_particles,
)
from napari_ppcasort._sample_data import SAMPLE_COUNTS, make_sample_data
from napari_ppcasort.core.particles import ArrayParticleSet, ParticleFileError, open_particles, write_particles
from napari_ppcasort.core.simulate import NOISE, OUTLIER, PARTICLE

from fixture_paths import CS, EMPIAR, RELION5, RELION31, TOY


def mrc_images(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # old stacks without map ID or machine stamp
        with mrcfile.open(path, permissive=True) as mrc:
            return np.asarray(mrc.data, dtype=np.float32).copy()


class CountingParticles:
    """Wraps a ParticleSet and records which particles were read."""

    def __init__(self, particles):
        self.particles = particles
        self.n_particles = particles.n_particles
        self.box_size = particles.box_size
        self.requests = []

    def read(self, indices):
        self.requests.append(np.asarray(indices).tolist())
        return self.particles.read(indices)


@pytest.mark.parametrize("name", ["x.mrcs", "x.MRC", "a/b/x.star", "x.cs"])
def test_get_reader_accepts_particle_files(name):
    assert get_reader(name) is read_particles
    assert get_reader([name, name]) is read_particles


@pytest.mark.parametrize("name", ["x.tif", "x.png", "x.mrcs.bak", "folder"])
def test_get_reader_declines_other_files(name):
    assert get_reader(name) is None
    assert get_reader(["x.mrcs", name]) is None


@pytest.mark.parametrize("path, stack_path, n", [
    (EMPIAR / "empiar_10076_7.mrc", EMPIAR / "empiar_10076_7.mrc", 7),
    (EMPIAR / "empiar_10076_7.star", EMPIAR / "empiar_10076_7.mrc", 7),
    (EMPIAR / "empiar_10076_7.cs", EMPIAR / "empiar_10076_7.mrc", 7),
    (RELION31 / "relion31.star", RELION31 / "relion31.mrcs", 5),
    (TOY / "toy_projections.mrcs", TOY / "toy_projections.mrcs", 1000),
])
def test_reader_opens_fixtures_as_lazy_3d_layers(path, stack_path, n):
    [(data, kwargs, kind)] = read_particles(str(path))
    expected = mrc_images(stack_path)
    assert kind == "image"
    assert isinstance(data, ParticleStack)
    assert data.shape == (n,) + expected.shape[1:] and data.ndim == 3 and data.dtype == np.float32
    assert kwargs["name"] == path.stem
    assert kwargs["metadata"]["path"] == str(path)
    low, high = kwargs["contrast_limits"]
    assert expected.min() <= low < high <= expected.max()
    np.testing.assert_array_equal(data[n - 1], expected[n - 1])
    np.testing.assert_array_equal(data[1:3, 10:20, 5], expected[1:3, 10:20, 5])


def test_reader_multistack_star_reads_each_image_from_its_stack():
    [(data, _, _)] = read_particles(str(RELION5 / "relion5.star"))
    particles = open_particles(RELION5 / "relion5.star")
    assert data.shape == (particles.n_particles, particles.box_size, particles.box_size)
    np.testing.assert_array_equal(np.asarray(data), particles.read(np.arange(particles.n_particles)))


def test_reader_reads_only_the_requested_images():
    counting = CountingParticles(open_particles(TOY / "toy_projections.mrcs"))
    stack = ParticleStack(counting)
    stack[500]
    stack[10:13]
    stack[np.array([7, 3])]
    assert counting.requests == [[500], [10, 11, 12], [7, 3]]


def test_reader_refuses_metadata_without_images():
    with pytest.raises(ParticleFileError, match="50 of its 50 image stacks are missing"):
        read_particles(str(CS / "cryosparc_P12_J24_001_particles.cs"))


def test_reader_reports_unreadable_file(tmp_path):
    bad = tmp_path / "broken.mrcs"
    bad.write_bytes(b"not an mrc file")
    with pytest.raises(ParticleFileError, match="broken.mrcs"):
        read_particles(str(bad))


def test_particle_stack_indexing_follows_numpy():
    images = np.arange(6 * 4 * 4, dtype=np.float32).reshape(6, 4, 4)
    stack = ParticleStack(ArrayParticleSet(images, "arange"))
    for key in [2, -1, slice(1, 5, 2), np.array([5, 0, 5]), np.array([True, False] * 3),
                (Ellipsis, 1), (slice(None), Ellipsis, slice(0, 2)), (3, slice(1, 3), 2)]:
        np.testing.assert_array_equal(stack[key], images[key])
    np.testing.assert_array_equal(np.asarray(stack), images)
    with pytest.raises(IndexError):
        stack[6]


def test_particle_stack_subset_maps_to_original_particles():
    images = np.random.default_rng(0).standard_normal((10, 4, 4)).astype(np.float32)
    stack = ParticleStack(ArrayParticleSet(images, "random"))
    subset = stack.subset(np.array([9, 2, 4]))
    assert not subset.is_whole_set and stack.is_whole_set
    np.testing.assert_array_equal(subset.indices, [9, 2, 4])
    np.testing.assert_array_equal(subset[1], images[2])
    np.testing.assert_array_equal(subset.subset(np.array([False, True, True]))[:], images[[2, 4]])


def test_array_particle_set_checks_its_images():
    with pytest.raises(ValueError, match="square images"):
        ArrayParticleSet(np.zeros((3, 4, 5)), "oblong")
    with pytest.raises(ValueError, match="square images"):
        ArrayParticleSet(np.zeros((4, 4)), "flat")
    images = np.zeros((3, 4, 4), dtype=np.float32)
    images[1, 2, 2] = np.nan
    particles = ArrayParticleSet(images, "holes")
    with pytest.raises(ParticleFileError, match="holes: image 1 contains NaN"):
        particles.read([0, 1])
    with pytest.raises(IndexError):
        particles.read([3])


def test_array_particle_set_writes_a_readable_star_and_stack(tmp_path):
    images = np.random.default_rng(1).standard_normal((8, 6, 6)).astype(np.float32)
    particles = ArrayParticleSet(images, "my layer", columns={"label": np.arange(8)}, pixel_size=1.5)
    written = write_particles(particles, [6, 1, 3], tmp_path, "subset")
    assert [p.name for p in written] == ["subset.mrcs", "subset.star"]
    back = open_particles(tmp_path / "subset.star")
    np.testing.assert_array_equal(back.read(np.arange(3)), images[[1, 3, 6]])
    assert back.table["label"].tolist() == [1, 3, 6]
    assert back.pixel_size == pytest.approx(1.5)


def test_sample_data_is_a_seeded_stack_with_known_junk():
    [(data, kwargs, kind)] = make_sample_data()
    [(again, _, _)] = make_sample_data()
    labels = kwargs["metadata"]["labels"]
    assert kind == "image" and data.shape == (2000, 32, 32)
    assert np.bincount(labels, minlength=3).tolist() == [
        SAMPLE_COUNTS["n_particles"], SAMPLE_COUNTS["n_outliers"], SAMPLE_COUNTS["n_noise"]]
    assert kwargs["metadata"]["label_names"][PARTICLE] == "particle"
    assert {OUTLIER, NOISE} <= set(kwargs["metadata"]["label_names"])
    np.testing.assert_array_equal(data.particles.table["ppcasortTrueLabel"], labels)
    np.testing.assert_array_equal(data[[0, 1999]], again[[0, 1999]])


def test_napari_opens_fixtures_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(str(EMPIAR / "empiar_10076_7.star"), plugin="napari-ppcasort")
    assert len(layers) == 1 and isinstance(layers[0].data, ParticleStack)
    assert layers[0].data.shape == (7, 320, 320)
    cs_layers = viewer.open(str(EMPIAR / "empiar_10076_7.cs"), plugin="napari-ppcasort")
    np.testing.assert_array_equal(cs_layers[0].data[6], layers[0].data[6])


def test_get_reader_declines_an_mrc_that_is_not_a_particle_stack(tmp_path):
    from fixture_paths import VOLUME

    assert get_reader(str(VOLUME)) is None  # a 3-D map: napari's other readers may open it
    micrograph = tmp_path / "micrograph.mrc"
    with mrcfile.new(micrograph, data=np.zeros((64, 96), np.float32)):
        pass
    assert get_reader(str(micrograph)) is None  # one image
    stack = tmp_path / "stack.mrc"
    with mrcfile.new(stack, data=np.zeros((5, 16, 16), np.float32)) as mrc:
        mrc.set_image_stack()
    assert get_reader(str(stack)) is read_particles


def test_layers_are_in_angstrom_when_the_pixel_size_is_known():
    [(_, kwargs, _)] = read_particles(str(RELION31 / "relion31.star"))
    pixel_size = open_particles(RELION31 / "relion31.star").pixel_size
    assert pixel_size and kwargs["scale"] == (1.0, pixel_size, pixel_size)
    assert kwargs["units"] == ("pixel", "angstrom", "angstrom")
    assert kwargs["axis_labels"] == ("particle", "y", "x")
