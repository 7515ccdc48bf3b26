"""Tests of napari_ppcasort.core.particles: reading stacks / STAR / .cs particle sets and writing subsets."""

import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from napari_ppcasort.core import particles as particles_module
from napari_ppcasort.core.particles import ArrayParticleSet, ParticleFileError, open_particles, write_particles

from fixture_paths import ASPIRE, CS, EMPIAR, RELION5, RELION31, TOY, VOLUME


def write_stack(path, images):
    """Write images (n, ny, nx) as an MRC image stack (mode from the dtype) and return the path."""
    with mrcfile.new(path, data=images, overwrite=True) as mrc:
        if images.ndim == 3:
            mrc.set_image_stack()
    return path


def write_star(path, image_names, optics=None):
    """Write a minimal particle STAR file (RELION 3.1 style when optics rows are given)."""
    particles = pd.DataFrame({"rlnImageName": image_names, "rlnOpticsGroup": 1})
    blocks = {"particles": particles}
    if optics is not None:
        blocks = {"optics": pd.DataFrame(optics), "particles": particles}
    starfile.write(blocks, path)
    return path


def stack_data(path):
    """All images of an MRC file as float32, read directly with mrcfile (some fixtures lack the map ID)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


# -- every fixture opens with the right numbers ------------------------------------------------------------

@pytest.mark.parametrize("path, kind, n_particles, box_size, pixel_size", [
    (ASPIRE / "sample.mrcs", "stack", 17, 200, None),
    (ASPIRE / "sample_particles_relion30.star", "star", 17, 200, 5e4 / 37369.207031),
    (ASPIRE / "sample_particles_relion31.star", "star", 17, 200, 1.4),
    (EMPIAR / "empiar_10076_7.mrc", "stack", 7, 320, None),
    (EMPIAR / "empiar_10076_7.star", "star", 7, 320, 5e4 / 38168),
    (EMPIAR / "empiar_10076_7.cs", "cs", 7, 320, 1.3099979),
    (RELION31 / "relion31.mrcs", "stack", 5, 256, 1.0),
    (RELION31 / "relion31.star", "star", 5, 256, 2.806),
    (RELION31 / "relion31.v2.star", "star", 5, 256, 2.806),
    (RELION31 / "relion31.6opticsgroups.star", "star", 139, 196, 1.25),
    (RELION5 / "relion5.star", "star", 17, 30, 0.89),
    (RELION5 / "toy_images_b.mrcs", "stack", 900, 30, 1.0),
    (TOY / "toy_projections.star", "star", 1000, 30, 1.0),
    (CS / "cryosparc_J2_particles_exported.cs", "cs", 22, 300, 1.345),
    (CS / "cryosparc_P12_J24_001_particles.cs", "cs", 2019, 180, 2.95),
])
def test_every_fixture_opens_with_count_box_and_pixel_size(path, kind, n_particles, box_size, pixel_size):
    with open_particles(path) as particles:
        assert particles.kind == kind
        assert particles.n_particles == n_particles == len(particles.table)
        assert particles.box_size == box_size
        if pixel_size is None:
            assert particles.pixel_size is None
        else:
            assert particles.pixel_size == pytest.approx(pixel_size, rel=1e-6)
        stack_index, slice_index = particles.locations()
        assert stack_index.shape == slice_index.shape == (n_particles,)
        assert stack_index.max() < len(particles.stack_paths)


def test_blocks_are_found_by_name_and_optics_kept():
    relion31 = open_particles(RELION31 / "relion31.star")
    assert list(relion31.optics["rlnImagePixelSize"]) == [2.806]
    assert open_particles(ASPIRE / "sample_particles_relion30.star").optics is None
    assert "dummyVariable" in open_particles(TOY / "toy_projections.star").table.columns


def test_relion31_v2_with_blocks_in_other_order_equals_relion31():
    with open_particles(RELION31 / "relion31.star") as first, open_particles(RELION31 / "relion31.v2.star") as second:
        columns = sorted(first.table.columns)
        assert columns == sorted(second.table.columns)
        pd.testing.assert_frame_equal(first.table[columns], second.table[columns])
        optics_columns = sorted(first.optics.columns)
        pd.testing.assert_frame_equal(first.optics[optics_columns], second.optics[sorted(second.optics.columns)])
        assert (first.box_size, first.pixel_size) == (second.box_size, second.pixel_size)
        np.testing.assert_array_equal(first.read(range(5)), second.read(range(5)))


def test_relion30_and_relion31_star_give_identical_images():
    with open_particles(ASPIRE / "sample_particles_relion30.star") as old, \
            open_particles(ASPIRE / "sample_particles_relion31.star") as new:
        images = old.read(np.arange(17))
        np.testing.assert_array_equal(images, new.read(np.arange(17)))
        np.testing.assert_array_equal(images, stack_data(ASPIRE / "sample.mrcs"))
        assert images.std() > 0.5


def test_empiar_cs_zero_based_and_star_one_based_give_the_same_seven_images():
    direct = stack_data(EMPIAR / "empiar_10076_7.mrc")
    with open_particles(EMPIAR / "empiar_10076_7.cs") as cs, open_particles(EMPIAR / "empiar_10076_7.star") as star:
        np.testing.assert_array_equal(cs.read(np.arange(7)), direct)
        np.testing.assert_array_equal(star.read(np.arange(7)), direct)
        np.testing.assert_array_equal(cs.locations()[1], np.arange(7))
        assert cs.table["blob/shape[0]"].tolist() == [320] * 7


def test_relion5_multistack_rows_resolve_to_the_right_stack():
    stacks = {name: stack_data(RELION5 / name) for name in ("toy_images_a.mrcs", "toy_images_b.mrcs")}
    assert not np.array_equal(stacks["toy_images_a.mrcs"][:11], stacks["toy_images_b.mrcs"][:11])
    with open_particles(RELION5 / "relion5.star") as particles:
        images = particles.read(np.arange(particles.n_particles))
        stack_index, slice_index = particles.locations()
        for row, image_name in enumerate(particles.table["rlnImageName"]):
            number, stack_name = image_name.split("@")
            np.testing.assert_array_equal(images[row], stacks[stack_name][int(number) - 1])
            assert particles.stack_paths[stack_index[row]].name == stack_name
            assert slice_index[row] == int(number) - 1


def test_read_any_order_with_repeats_and_iter_chunks():
    direct = stack_data(TOY / "toy_projections.mrcs")
    with open_particles(TOY / "toy_projections.star") as particles:
        order = np.array([999, 5, 1, 5, 0, 500])
        np.testing.assert_array_equal(particles.read(order), direct[order])
        assert particles.read([]).shape == (0, 30, 30)
        visit = np.random.default_rng(0).permutation(1000)[:50]
        chunks = list(particles.iter_chunks(visit, chunk_size=7))
        assert [len(indices) for indices, _ in chunks] == [7] * 7 + [1]
        np.testing.assert_array_equal(np.concatenate([indices for indices, _ in chunks]), visit)
        np.testing.assert_array_equal(np.concatenate([images for _, images in chunks]), direct[visit])
        default_chunks = list(particles.iter_chunks())
        assert len(default_chunks) == 1 and default_chunks[0][1].shape == (1000, 30, 30)
        with pytest.raises(IndexError, match="1000"):
            particles.read([1000])


def test_small_stack_cache_reads_correctly_and_reopens_after_close(monkeypatch):
    monkeypatch.setattr(particles_module, "MAX_OPEN_STACKS", 1)
    with open_particles(RELION5 / "relion5.star") as particles:
        expected = particles.read(np.arange(17))
        particles.close()
        alternating = np.array([0, 1, 2, 1, 0, 16])
        for row in alternating:
            np.testing.assert_array_equal(particles.read([row])[0], expected[row])
        assert len(particles._open_stacks) == 1


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32, ">i2", ">f4"])
def test_integer_and_half_precision_stacks_read_as_float32(tmp_path, dtype):
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    values = np.linspace(max(float(info.min), -1000), min(float(info.max), 1000), 3 * 8 * 8)
    data = values.reshape(3, 8, 8).astype(dtype)
    path = write_stack(tmp_path / "typed.mrcs", data)
    with open_particles(path) as particles:
        images = particles.read([2, 0])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, data[[2, 0]].astype(np.float32))
    assert images.min() < 0 or dtype == np.uint16
    assert images.max() > 100


def test_single_image_file_is_a_stack_of_one(tmp_path):
    image = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    with open_particles(write_stack(tmp_path / "one.mrc", image)) as particles:
        assert (particles.n_particles, particles.box_size) == (1, 16)
        np.testing.assert_array_equal(particles.read([0, 0]), np.stack([image, image]))


def test_stack_found_by_project_relative_path_and_by_file_name(tmp_path):
    data = np.random.default_rng(1).normal(size=(3, 12, 12)).astype(np.float32)
    (tmp_path / "Extract" / "job001").mkdir(parents=True)
    write_stack(tmp_path / "Extract" / "job001" / "s.mrcs", data)
    job = tmp_path / "Select" / "job003"
    job.mkdir(parents=True)
    write_stack(job / "moved.mrcs", data[::-1])
    star = write_star(job / "particles.star", ["2@Extract/job001/s.mrcs", "1@Old/place/moved.mrcs"])
    with open_particles(star) as particles:
        assert particles.stack_paths == [tmp_path / "Extract" / "job001" / "s.mrcs", job / "moved.mrcs"]
        np.testing.assert_array_equal(particles.read([0, 1]), data[[1, 2]])
        assert particles.missing_stacks == []


def test_cs_project_relative_blob_path_with_marker(tmp_path):
    records = np.load(CS / "cryosparc_J2_particles_exported.cs")
    stack_name = records["blob/path"][0].decode().removeprefix(">")
    data = np.random.default_rng(2).normal(size=(22, 300, 300)).astype(np.float32)
    (tmp_path / stack_name).parent.mkdir(parents=True)
    write_stack(tmp_path / stack_name, data)
    (tmp_path / "J2").mkdir()
    shutil.copy(CS / "cryosparc_J2_particles_exported.cs", tmp_path / "J2" / "particles.cs")
    with open_particles(tmp_path / "J2" / "particles.cs") as particles:
        assert particles.stack_paths == [tmp_path / stack_name]
        np.testing.assert_array_equal(particles.read([3, 21]), data[records["blob/idx"][[3, 21]]])


def test_metadata_only_cs_opens_and_reading_names_the_missing_stack():
    with open_particles(CS / "cryosparc_P12_J24_001_particles.cs") as particles:
        assert len(particles.missing_stacks) == len(particles.stack_paths) == 50
        assert particles.table["ctf/type"].iloc[0] == "ctffind4"
        assert particles.table.shape == (2019, 38)
        with pytest.raises(ParticleFileError, match=r"cryosparc_P12_J24_001_particles\.cs.*J19/extract/.*not found"):
            particles.read([0])


# -- writing ---------------------------------------------------------------------------------------------

def test_write_then_read_keeps_columns_unknown_labels_row_order_and_images(tmp_path):
    keep = np.array([900, 3, 17, 250, 4, 999, 0])
    kept = np.sort(keep)
    with open_particles(TOY / "toy_projections.star") as particles:
        scores = np.linspace(-1.5, 2.5, particles.n_particles)
        scores[3] = np.nan  # e.g. a particle never scored
        scores[4] = 1e-9
        rounds = np.arange(particles.n_particles) % 4
        written = write_particles(particles, keep, tmp_path / "out", "kept",
                                  extra_columns={"ppcasortScore": scores, "ppcasortRound": rounds})
        assert written == [tmp_path / "out" / "kept.mrcs", tmp_path / "out" / "kept.star"]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kept.mrcs", "kept.star"]
        assert "_dummyVariable" in (tmp_path / "out" / "kept.star").read_text()
        with open_particles(written[1]) as subset:
            original = particles.table.iloc[kept].reset_index(drop=True)
            table = subset.table
            assert list(table.columns) == list(original.columns) + ["ppcasortSourceImageName", "ppcasortScore",
                                                                    "ppcasortRound"]
            other = [c for c in original.columns if c != "rlnImageName"]
            pd.testing.assert_frame_equal(table[other], original[other])
            assert table["ppcasortSourceImageName"].tolist() == original["rlnImageName"].tolist()
            # outside the working directory, the new stack is named by its absolute path
            stack = (tmp_path / "out" / "kept.mrcs").resolve().as_posix()
            assert table["rlnImageName"].tolist() == [f"{k:06d}@{stack}" for k in range(1, 8)]
            np.testing.assert_array_equal(table["ppcasortScore"], scores[kept])
            np.testing.assert_array_equal(table["ppcasortRound"], rounds[kept])
            np.testing.assert_array_equal(subset.read(np.arange(7)), particles.read(kept))
    with mrcfile.open(written[0]) as mrc:
        assert mrc.is_image_stack() and mrc.data.dtype == np.float32
        assert float(mrc.voxel_size.x) == pytest.approx(1.0)
        assert float(mrc.header.dmean) == pytest.approx(float(mrc.data.mean()), abs=1e-5)
        assert float(mrc.header.rms) == pytest.approx(float(mrc.data.std()), rel=1e-4)


def test_image_names_are_relative_to_the_project_folder(tmp_path, monkeypatch):
    """RELION resolves image names from the folder it runs in: name the stack relative to it."""
    monkeypatch.chdir(tmp_path)
    with open_particles(TOY / "toy_projections.star") as particles:
        written = write_particles(particles, [5, 6], Path("PPCAsort") / "job001", "kept")
        assert starfile.read(written[1])["rlnImageName"].tolist() == [
            "000001@PPCAsort/job001/kept.mrcs", "000002@PPCAsort/job001/kept.mrcs"]
        monkeypatch.chdir(tmp_path / "PPCAsort")  # and our reader still finds it from elsewhere
        with open_particles(tmp_path / written[1]) as subset:
            np.testing.assert_array_equal(subset.read([0, 1]), particles.read([5, 6]))


@pytest.mark.parametrize("star", [RELION31 / "relion31.star", RELION5 / "relion5.star",
                                  ASPIRE / "sample_particles_relion30.star"])
def test_write_keeps_optics_block_names_and_dtypes(tmp_path, star):
    with open_particles(star) as particles:
        keep = np.array([4, 1, 2])
        written = write_particles(particles, keep, tmp_path, "subset",
                                  extra_columns={"ppcasortScore": np.full(particles.n_particles, 0.25)})
        blocks_in = starfile.read(star, always_dict=True)
        blocks_out = starfile.read(written[1], always_dict=True)
        assert list(blocks_out) == list(blocks_in)
        if particles.optics is not None:
            pd.testing.assert_frame_equal(blocks_out["optics"], blocks_in["optics"])
        with open_particles(written[1]) as subset:
            columns = [c for c in particles.table.columns if c != "rlnImageName"]
            pd.testing.assert_frame_equal(subset.table[columns],
                                          particles.table.iloc[[1, 2, 4]].reset_index(drop=True)[columns])
            assert subset.pixel_size == pytest.approx(particles.pixel_size)
            np.testing.assert_array_equal(subset.read([0, 1, 2]), particles.read([1, 2, 4]))


def test_write_given_images_instead_of_stack_images(tmp_path):
    with open_particles(RELION31 / "relion31.star") as particles:
        processed = -2 * particles.read(np.arange(5))
        written = write_particles(particles, [3, 0], tmp_path, "processed", images=processed)
        np.testing.assert_array_equal(stack_data(written[0]), processed[[0, 3]])
        with pytest.raises(ValueError, match="shape"):
            write_particles(particles, [0], tmp_path, "bad", images=processed[:, :10])


def test_write_from_plain_stack(tmp_path):
    with open_particles(RELION5 / "toy_images_a.mrcs") as particles:
        written = write_particles(particles, [10, 2], tmp_path, "from_stack",
                                  extra_columns={"ppcasortScore": np.arange(100.0)})
        with open_particles(written[1]) as subset:
            assert subset.table["ppcasortScore"].tolist() == [2.0, 10.0]
            np.testing.assert_array_equal(subset.read([0, 1]), particles.read([2, 10]))


def test_write_cs_subset_keeps_dtype_and_blob_fields(tmp_path):
    with open_particles(EMPIAR / "empiar_10076_7.cs") as particles:
        written = write_particles(particles, [6, 0, 3], tmp_path, "kept")
        assert written == [tmp_path / "kept.cs"]
        subset = np.load(written[0], allow_pickle=False)
        assert subset.dtype == particles.records.dtype
        np.testing.assert_array_equal(subset, particles.records[[0, 3, 6]])
        # per-particle outputs become fields of their own prefix beside every original field
        scored = write_particles(particles, [6, 0, 3], tmp_path / "scored", "kept",
                                 extra_columns={"ppcasortScore": np.arange(7.0), "ppcasortJunkProbability": np.full(7, 0.25)})
        records = np.load(scored[0], allow_pickle=False)
        assert records.dtype.names == (*particles.records.dtype.names, "ppcasort/score", "ppcasort/junk_probability")
        np.testing.assert_array_equal(records["ppcasort/score"], [0.0, 3.0, 6.0])
        np.testing.assert_array_equal(records["uid"], particles.records["uid"][[0, 3, 6]])
        with pytest.raises(ValueError, match="original stacks"):
            write_particles(particles, [0], tmp_path, "with_images", images=particles.read(np.arange(7)))
    (tmp_path / "empiar_10076_7.mrc").symlink_to(EMPIAR / "empiar_10076_7.mrc")
    with open_particles(written[0]) as subset:
        np.testing.assert_array_equal(subset.read([0, 1, 2]), stack_data(EMPIAR / "empiar_10076_7.mrc")[[0, 3, 6]])


def test_write_refuses_to_overwrite_inputs(tmp_path):
    data = np.ones((4, 10, 10), dtype=np.float32)
    stack = write_stack(tmp_path / "parts.mrcs", data)
    star = write_star(tmp_path / "parts.star", ["1@parts.mrcs", "2@parts.mrcs"])
    before = stack.read_bytes(), star.read_bytes()
    with open_particles(star) as particles:
        with pytest.raises(ParticleFileError, match=r"parts\.mrcs.*refusing to overwrite"):
            write_particles(particles, [0], tmp_path, "parts")
    with open_particles(stack) as particles:
        with pytest.raises(ParticleFileError, match=r"parts\.mrcs.*refusing to overwrite"):
            write_particles(particles, [0], tmp_path / "." / "sub" / "..", "parts")
    (tmp_path / "link.mrcs").hardlink_to(stack)
    with open_particles(tmp_path / "link.mrcs") as particles:
        with pytest.raises(ParticleFileError, match="refusing to overwrite"):
            write_particles(particles, [0], tmp_path, "parts")
    assert (stack.read_bytes(), star.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mrcs", "parts.mrcs", "parts.star", "sub"]


def test_write_rejects_empty_subset_and_bad_extra_columns(tmp_path):
    with open_particles(RELION31 / "relion31.star") as particles:
        with pytest.raises(ValueError, match="empty"):
            write_particles(particles, [], tmp_path, "none")
        with pytest.raises(ValueError, match="ppcasortScore"):
            write_particles(particles, [0], tmp_path, "short", extra_columns={"ppcasortScore": np.zeros(3)})
        with pytest.raises(ValueError, match="plain file name"):
            write_particles(particles, [0], tmp_path, "a/b")
    assert list(tmp_path.iterdir()) == []


# -- bad input ------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ParticleFileError, match=r"nope\.star: no such file"):
        open_particles(tmp_path / "nope.star")


def test_not_an_mrc(tmp_path):
    path = tmp_path / "text.mrcs"
    path.write_text("data_particles\nloop_\n_rlnImageName #1\n" * 100)
    with pytest.raises(ParticleFileError, match=r"text\.mrcs: not .*MRC"):
        open_particles(path)
    (tmp_path / "tiny.mrc").write_bytes(b"\x00" * 10)
    with pytest.raises(ParticleFileError, match=r"tiny\.mrc: not an MRC"):
        open_particles(tmp_path / "tiny.mrc")


def test_truncated_mrc(tmp_path):
    path = write_stack(tmp_path / "cut.mrcs", np.zeros((5, 16, 16), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ParticleFileError, match=r"cut\.mrcs: truncated MRC file"):
        open_particles(path)


def test_volume_where_a_stack_is_expected(tmp_path):
    with pytest.raises(ParticleFileError, match=r"clean70SRibosome_vol_65p\.mrc: is a 3-D volume"):
        open_particles(VOLUME)
    star = write_star(tmp_path / "vol.star", [f"1@{VOLUME}"])
    with pytest.raises(ParticleFileError, match=r"clean70SRibosome_vol_65p\.mrc: is a 3-D volume"):
        open_particles(star)
    # RELION writes .mrcs stacks with the volume space group 1, so a cube of images named .mrcs is a stack
    cube = np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32)
    with mrcfile.new(tmp_path / "cube.mrcs", data=cube) as mrc:
        assert mrc.header.ispg == 1
    with open_particles(tmp_path / "cube.mrcs") as particles:
        assert particles.n_particles == 16
    shutil.copy(tmp_path / "cube.mrcs", tmp_path / "cube.mrc")
    with pytest.raises(ParticleFileError, match=r"cube\.mrc: is a 3-D volume \(16 x 16 x 16 voxels"):
        open_particles(tmp_path / "cube.mrc")


def test_non_square_images(tmp_path):
    path = write_stack(tmp_path / "wide.mrcs", np.zeros((3, 20, 24), dtype=np.float32))
    with pytest.raises(ParticleFileError, match=r"wide\.mrcs: images are not square \(24 x 20"):
        open_particles(path)


def test_star_whose_stack_is_missing(tmp_path):
    star = write_star(tmp_path / "lost.star", ["1@gone.mrcs", "2@gone.mrcs"])
    with pytest.raises(ParticleFileError, match=r"gone\.mrcs not found"):
        open_particles(star)
    optics = {"rlnOpticsGroup": [1], "rlnImageSize": [64], "rlnImagePixelSize": [1.5]}
    star = write_star(tmp_path / "lost31.star", ["1@gone.mrcs", "2@gone.mrcs"], optics)
    with open_particles(star) as particles:
        assert (particles.n_particles, particles.box_size, particles.pixel_size) == (2, 64, 1.5)
        assert particles.missing_stacks == [tmp_path / "gone.mrcs"]
        with pytest.raises(ParticleFileError, match=r"lost31\.star: image stack 'gone\.mrcs' not found"):
            particles.read([1])
        with pytest.raises(ParticleFileError, match=r"lost31\.star: image stack 'gone\.mrcs' not found"):
            write_particles(particles, [0, 1], tmp_path / "out", "kept")
    assert list((tmp_path / "out").iterdir()) == []


def test_star_index_out_of_range(tmp_path):
    stack = EMPIAR / "empiar_10076_7.mrc"
    star = write_star(tmp_path / "range.star", [f"7@{stack}", f"8@{stack}"])
    with pytest.raises(ParticleFileError, match=r"range\.star: particle 1 asks for image 8 .*empiar_10076_7\.mrc, "
                                                r"which holds only 7 images"):
        open_particles(star)


def test_bad_image_name(tmp_path):
    star = write_star(tmp_path / "names.star", ["1@a.mrcs", "x@a.mrcs"])
    with pytest.raises(ParticleFileError, match=r"names\.star: particle 1 has rlnImageName 'x@a\.mrcs'"):
        open_particles(star)


def test_mixed_box_sizes(tmp_path):
    write_stack(tmp_path / "small.mrcs", np.zeros((2, 20, 20), dtype=np.float32))
    write_stack(tmp_path / "large.mrcs", np.zeros((2, 24, 24), dtype=np.float32))
    star = write_star(tmp_path / "mixed.star", ["1@small.mrcs", "1@large.mrcs"])
    with pytest.raises(ParticleFileError, match=r"mixed\.star: mixed box sizes: .*small\.mrcs holds 20 px .*"
                                                r"large\.mrcs holds 24 px"):
        open_particles(star)


def test_mixed_pixel_sizes(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 20, 20), dtype=np.float32))
    optics = {"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.0, 1.5]}
    star = tmp_path / "pixels.star"
    starfile.write({"optics": pd.DataFrame(optics),
                    "particles": pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"], "rlnOpticsGroup": [1, 2]})},
                   star)
    with pytest.raises(ParticleFileError, match=r"pixels\.star: particles have pixel sizes from 1 to 1.5"):
        open_particles(star)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_infinite_pixels(tmp_path, bad_value):
    data = np.zeros((4, 10, 10), dtype=np.float32)
    data[2, 5, 5] = bad_value
    star = write_star(tmp_path / "nan.star", ["1@nan.mrcs", "3@nan.mrcs", "4@nan.mrcs"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of the bad pixels
        write_stack(tmp_path / "nan.mrcs", data)
    with open_particles(star) as particles:
        assert particles.read([0, 2]).shape == (2, 10, 10)
        with pytest.raises(ParticleFileError, match=r"nan\.mrcs: image 3 \(particle 1 of .*nan\.star\) contains NaN"):
            particles.read([2, 1])


def test_compressed_and_non_structured_cs(tmp_path):
    compressed = tmp_path / "compressed.cs"
    compressed.write_bytes(b"\x95CSDAT" + bytes(100))
    with pytest.raises(ParticleFileError, match=r"compressed\.cs: compressed cryoSPARC .* not supported.*export"):
        open_particles(compressed)
    plain = tmp_path / "plain.cs"
    with open(plain, "wb") as stream:
        np.save(stream, np.arange(5))
    with pytest.raises(ParticleFileError, match=r"plain\.cs: not a cryoSPARC \.cs file"):
        open_particles(plain)


def test_unknown_extension_and_star_without_particles(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ParticleFileError, match=r"notes\.txt: unknown file type"):
        open_particles(tmp_path / "notes.txt")
    star = tmp_path / "micrographs.star"
    starfile.write({"micrographs": pd.DataFrame({"rlnMicrographName": ["a.mrc"]})}, star)
    with pytest.raises(ParticleFileError, match=r"micrographs\.star: no particle table"):
        open_particles(star)


# -- array-backed particle sets ------------------------------------------------------------------------------


def test_array_particle_set_iterates_requested_indices_in_chunks():
    images = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), dtype=np.float32)
    particles = ArrayParticleSet(images)
    assert particles.n_particles == 10 and particles.box_size == 4
    chunks = list(particles.iter_chunks([7, 2, 9, 0, 5], chunk_size=2))
    assert [list(indices) for indices, _ in chunks] == [[7, 2], [9, 0], [5]]
    for indices, chunk in chunks:
        assert chunk.dtype == np.float32
        np.testing.assert_array_equal(chunk[:, 0, 0], indices)
    assert sum(len(i) for i, _ in particles.iter_chunks()) == 10
    with pytest.raises(IndexError, match="particle index 10 out of range for the 10 particles"):
        list(particles.iter_chunks([10]))
    with pytest.raises(ValueError, match="square images"):
        ArrayParticleSet(np.zeros((3, 4, 5)))


def _resident_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_array_particle_set_on_memmap_reads_correctly_and_unmaps_what_it_read(tmp_path):
    images = np.random.default_rng(5).normal(size=(600, 64, 64)).astype(np.float32)  # 9.4 MiB
    path = tmp_path / "stack.mrcs"
    with mrcfile.new(path, data=images) as mrc:
        mrc.set_image_stack()
    with mrcfile.mmap(path, mode="r") as mrc:
        particles = ArrayParticleSet(mrc.data)
        baseline = _resident_kb()
        order = np.random.default_rng(6).permutation(600)
        for chunk_indices, chunk in particles.iter_chunks(order, chunk_size=50):
            np.testing.assert_array_equal(chunk, images[chunk_indices])
            assert _resident_kb() - baseline < 2 * 1024  # far less than the 9.4 MiB read
        # pages come back from the page cache when read again
        again = next(particles.iter_chunks([5, 3], chunk_size=2))[1]
        np.testing.assert_array_equal(again, images[[5, 3]])


def test_array_particle_set_keeps_edits_of_copy_on_write_memmap(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((4, 8, 8), dtype=np.float32))
    edited = np.load(path, mmap_mode="c")
    edited[2, 1, 1] = 7.0
    chunks = list(ArrayParticleSet(edited).iter_chunks(chunk_size=1))
    assert chunks[2][1][0, 1, 1] == 7.0
    assert next(ArrayParticleSet(edited).iter_chunks([2]))[1][0, 1, 1] == 7.0


_READ_SCATTERED = """
import sys
import numpy as np
from napari_ppcasort.core.particles import open_particles

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(key))

with open_particles(sys.argv[1]) as particles:
    rows = np.sort(np.random.default_rng(0).choice(particles.n_particles, 500, replace=False))
    before = status("VmRSS")
    images = particles.read(rows)
    print(status("VmHWM") - before, float(images.sum(dtype=np.float64)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_scattered_reads_do_not_map_the_stack_into_memory(tmp_path):
    """500 scattered images of a 80 MB stack (2 MB of pixels) raise the reading process's peak memory by about
    what was read, not by the kernel's read-around of every page fault through a memory map (64 kB or more a
    fault: 32 MB or more), and give the images mrcfile reads."""
    import subprocess
    import sys

    images = np.random.default_rng(1).standard_normal((20000, 32, 32)).astype(np.float32)
    path = write_stack(tmp_path / "big.mrcs", images)
    rows = np.sort(np.random.default_rng(0).choice(20000, 500, replace=False))
    grown_kib, total = subprocess.run([sys.executable, "-c", _READ_SCATTERED, str(path)], check=True,
                                      capture_output=True, text=True).stdout.split()
    assert int(grown_kib) < 12 * 1024
    assert float(total) == pytest.approx(float(images[rows].sum(dtype=np.float64)), rel=1e-9)


def test_read_rows_reads_runs_and_scattered_rows_of_a_memmap_as_indexing_does(tmp_path):
    data = np.arange(50 * 3 * 4, dtype=np.int16).reshape(50, 3, 4)
    path = tmp_path / "rows.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.int16, mode="r", shape=(50, 3, 4))
    for rows in ([0, 1, 2, 7, 8, 30, 49], [5], [], list(range(50))):
        got = particles_module.read_rows(mapped, np.array(rows, dtype=np.int64))
        np.testing.assert_array_equal(got, data[rows])
        assert got.dtype == data.dtype and not isinstance(got, np.memmap)
    # a view that starts inside the mapping is read by indexing, correctly too
    np.testing.assert_array_equal(particles_module.read_rows(mapped[10:], np.array([0, 3])), data[[10, 13]])
