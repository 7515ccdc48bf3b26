"""The whole sort as the GUI and the command line run it: particles -> coefficients -> rounds -> outputs.

    settings = SortSettings(n_subspaces=3, total_dimension=60)
    prepared = prepare_coefficients(particles, settings)          # images -> basis coefficients
    sorter = make_sorter(settings, prepared.basis)                # model + score + pruning schedule
    for result in sorter.rounds(prepared.coefficients): ...       # one SortRound per pruning round
    export_results(particles, result, kept_mask, out_dir, settings)
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .bases import PCABasis, PSWFBasis, expand_particles
from .mixture import NOISE_MODELS, MixtureParameters
from .mppca import MixturePPCA
from .preprocess import Preprocessor
from .sorting import COMBINATIONS, OnlineSorter, SortingFactorScore, SortRound
from .steerable import MeanEvidenceScore, SteerableMixturePPCA

__all__ = [
    "BASES",
    "MODELS",
    "score_label",
    "OUTPUT_NAMES",
    "SortSettings",
    "PreparedCoefficients",
    "prepare_coefficients",
    "make_sorter",
    "subspace_images",
    "export_results",
    "OutputExistsError",
    "existing_outputs",
]

BASES = ("pca", "pswf")
#: 'steerable': rotation-closed mixture of PPCA scored by the mean evidence (core/steerable.py), the default;
#: 'paper': the paper's mixture of PPCA scored by the sorting factor (core/mppca.py, core/sorting.py).
MODELS = ("steerable", "paper")
#: Files an export writes in its output folder (the .star/.mrcs pair, or .cs, per set).
OUTPUT_NAMES = ("kept", "rejected", "scores.csv", "parameters.json")

Progress = Callable[[int, int], None]


@dataclass
class SortSettings:
    """Every parameter of a sort, with the defaults of the product. See the README for when to change each.

    model : 'steerable' (the default: subspaces closed under in-plane rotation, junk score = minus the
        evidence, in standard deviations, that the image carries its class's and the population's
        rotational average; needs the PSWF basis) or 'paper' (the paper's mixture of PPCA and sorting
        factor, with combine and center).
    n_subspaces : M, the number of subspaces (views or conformations the particles spread over).
    total_dimension : M * K, the summed dimension of the subspaces (the paper's K_total); each subspace
        gets total_dimension // n_subspaces dimensions.
    alpha : fraction of the remaining images removed at each pruning round.
    iterations_per_round : P, EM iterations between prunings.
    n_rounds : number of pruning rounds (None: until target_kept_fraction is reached).
    target_kept_fraction : stop when this fraction of the stack is left (None: after n_rounds).
    basis : 'pswf' (prolate spheroidal wave functions, the paper's steerable basis) or 'pca' (principal
        components of the images inside the mask).
    n_coefficients : number of basis coefficients L (PSWF: the band limit is lowered until that many
        functions remain, a low-pass basis; None: PCA estimates it from the noise level with the
        Marchenko-Pastur edge, PSWF keeps every function up to Nyquist).
    box_size : Fourier-crop larger images to this box (pixels) before anything else; smaller images are
        kept as they are (None: never crop).
    mask_radius : radius of the particle circle in pixels of the (cropped) box (None: box // 2 - 1).
    normalize : normalise each image on the background outside the circle (mean 0, std 1).
    combine : how the sorting factor combines subspaces: 'sum' (the paper), 'min', 'responsibility'
        (model 'paper' only).
    center : score y - mu_m instead of y (model 'paper' only).
    noise : 'shared' noise variance across subspaces (the paper) or 'per_component'.
    random_state : seed of every random choice (sampling, initialisation).
    outlier_threshold : the automatic mode (None: off): a round removes only images whose score is a
        robust outlier of that round's scores (robust z-score, median/MAD, of the score, or of its
        logarithm when every score is positive as sorting factors are, above this), at most
        alpha of the rest, and the sort stops after a round that finds none; n_rounds and
        target_kept_fraction may then both be None.
    """

    model: str = "steerable"
    n_subspaces: int = 3
    total_dimension: int = 60
    alpha: float = 0.05
    iterations_per_round: int = 6
    n_rounds: int | None = 5
    target_kept_fraction: float | None = None
    basis: str = "pswf"
    n_coefficients: int | None = 300
    box_size: int | None = 64
    mask_radius: float | None = None
    normalize: bool = True
    combine: str = "sum"
    center: bool = False
    noise: str = "shared"
    random_state: int = 0
    outlier_threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.n_subspaces, int) or self.n_subspaces < 1:
            raise ValueError(f"n_subspaces must be a positive integer, got {self.n_subspaces!r}")
        if not isinstance(self.total_dimension, int) or self.total_dimension < self.n_subspaces:
            raise ValueError(
                f"total_dimension must be an integer of at least n_subspaces ({self.n_subspaces}), "
                f"got {self.total_dimension!r}"
            )
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.model == "steerable" and self.basis != "pswf":
            raise ValueError(f"the steerable model needs the steerable basis 'pswf', not {self.basis!r}; "
                             "use basis 'pswf', or model 'paper' for the PCA basis")
        if self.model == "steerable" and (self.combine != "sum" or self.center):
            raise ValueError("combine and center set the sorting factor of model 'paper'; the steerable model "
                             "is scored by the mean evidence (leave combine='sum', center=False)")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {self.noise!r}")
        if self.combine not in COMBINATIONS:
            raise ValueError(f"combine must be one of {COMBINATIONS}, got {self.combine!r}")
        if self.n_coefficients is not None and self.n_coefficients <= self.total_dimension:
            raise ValueError(
                f"n_coefficients ({self.n_coefficients}) must exceed total_dimension ({self.total_dimension})"
            )
        # the sorter checks alpha, rounds and target; build one now (on a stand-in model) so bad values fail early
        _online_sorter(self, MixturePPCA(self.n_subspaces, self.subspace_dimension), scorer=None)

    @property
    def subspace_dimension(self) -> int:
        """K, the dimension of each subspace."""
        return self.total_dimension // self.n_subspaces

    def to_dict(self) -> dict:
        return asdict(self)

    def used_settings(self) -> dict:
        """The settings that shape this sort: all but combine and center for the steerable model."""
        values = self.to_dict()
        if self.model == "steerable":
            del values["combine"], values["center"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "SortSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; valid ones are {sorted(known)}")
        return cls(**values)


@dataclass
class PreparedCoefficients:
    """Basis coefficients of a particle set, with the basis and preprocessing that made them.

    coefficients : (N, L) float32, row i for particle i of the set.
    """

    coefficients: np.ndarray
    basis: PCABasis | PSWFBasis
    preprocessor: Preprocessor


def prepare_coefficients(particles, settings: SortSettings, progress: Progress | None = None) -> PreparedCoefficients:
    """Preprocess every image of ``particles`` and expand it in the chosen basis, chunk by chunk.

    ``particles`` is a ParticleSet (or anything with ``n_particles``, ``box_size`` and ``iter_chunks``).
    ``progress(done, total)`` is called after each chunk.
    """
    crop = settings.box_size is not None and settings.box_size < particles.box_size
    preprocessor = Preprocessor(
        box_size=particles.box_size,
        target_box=settings.box_size if crop else None,
        mask_radius=settings.mask_radius,
        normalize=settings.normalize,
    )
    if settings.basis == "pswf":
        basis = PSWFBasis(preprocessor.output_box, radius=preprocessor.radius, max_coefficients=settings.n_coefficients)
    else:
        basis = PCABasis(
            preprocessor.output_box,
            radius=preprocessor.radius,
            n_components=settings.n_coefficients,
            random_state=settings.random_state,
        )
        rng = np.random.default_rng(settings.random_state)
        n_sample = min(particles.n_particles, basis.sample_size)
        sample = np.sort(rng.choice(particles.n_particles, size=n_sample, replace=False))
        basis.fit(preprocessor(images) for _, images in particles.iter_chunks(sample))
    if basis.n_coefficients <= settings.total_dimension:
        raise ValueError(
            f"the {settings.basis.upper()} basis gives {basis.n_coefficients} coefficients, not more than the "
            f"total dimension {settings.total_dimension}: lower total_dimension or ask for more coefficients"
        )
    coefficients = expand_particles(particles, basis, preprocessor, progress=progress)
    return PreparedCoefficients(coefficients=coefficients, basis=basis, preprocessor=preprocessor)


def make_sorter(settings: SortSettings, basis: PCABasis | PSWFBasis) -> OnlineSorter:
    """The online sorter (model, score and pruning schedule) that ``settings`` describe.

    ``basis`` is the basis the coefficients were expanded in (``PreparedCoefficients.basis``): the
    steerable model needs its angular frequencies, radial indices and cos/sin flags.
    """
    if settings.model == "paper":
        model = MixturePPCA(settings.n_subspaces, settings.subspace_dimension, noise=settings.noise,
                            random_state=settings.random_state)
        scorer = SortingFactorScore(settings.combine, settings.center)
    else:
        if not isinstance(basis, PSWFBasis):
            raise ValueError(f"the steerable model needs coefficients in the PSWF basis, got {type(basis).__name__}")
        model = SteerableMixturePPCA(basis.angular_frequencies, basis.is_sine, basis.radial_indices,
                                     settings.n_subspaces, settings.subspace_dimension, noise=settings.noise,
                                     random_state=settings.random_state)
        scorer = MeanEvidenceScore()
    return _online_sorter(settings, model, scorer)


def _online_sorter(settings: SortSettings, model, scorer) -> OnlineSorter:
    return OnlineSorter(
        model,
        alpha=settings.alpha,
        iterations_per_round=settings.iterations_per_round,
        n_rounds=settings.n_rounds,
        target_kept_fraction=settings.target_kept_fraction,
        scorer=scorer,
        outlier_threshold=settings.outlier_threshold,
    )


def score_label(settings: SortSettings) -> str:
    """What the junk score of a sort with ``settings`` is, for axis labels and reports."""
    if settings.model == "paper":
        return "junk score (sorting factor)"
    return "junk score (minus mean evidence, SD)"


def subspace_images(basis, parameters: MixtureParameters, n_per_subspace: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The subspaces as images: means (M, box, box) and top components (M, n, box, box), through the basis.

    Components are the orthonormal axes of each subspace ordered by variance, at most ``n_per_subspace``.
    """
    axes, _ = parameters.orthonormal_components()
    n_shown = min(n_per_subspace, axes.shape[1])
    means = basis.evaluate(parameters.means)
    top = axes[:, :n_shown].reshape(-1, axes.shape[2])
    components = basis.evaluate(top).reshape(axes.shape[0], n_shown, *means.shape[1:])
    return means, components


class OutputExistsError(FileExistsError):
    """The output folder already holds results; pass force=True to replace them."""


def existing_outputs(out_dir: Path) -> list[Path]:
    """Results of an earlier export in ``out_dir`` (kept.*, rejected.*, scores.*, parameters.*, report.*)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.name.split(".")[0] in ("kept", "rejected", "scores", "parameters", "report"))


def export_results(
    particles,
    result: SortRound,
    kept_mask: np.ndarray,
    out_dir,
    settings: SortSettings,
    *,
    force: bool = False,
) -> dict[str, list[Path]]:
    """Write the kept and rejected sets, the per-particle scores (CSV) and the parameters (JSON).

    kept_mask : (N,) bool, True for the particles to keep (the sort's own selection is
        ``result.removal_round == 0``; the GUI passes the user's threshold instead).
    Returns {"kept": [...], "rejected": [...], "scores": [path], "parameters": [path]}.
    Refuses (OutputExistsError) to replace earlier results in ``out_dir`` unless ``force``.
    """
    from .particles import write_particles

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept_mask = np.asarray(kept_mask, dtype=bool)
    if kept_mask.shape != (result.n_total,):
        raise ValueError(f"kept_mask must have one entry per particle ({result.n_total}), got shape {kept_mask.shape}")
    existing = existing_outputs(out_dir)
    if existing and not force:
        raise OutputExistsError(
            f"{out_dir} already holds results ({', '.join(p.name for p in existing)}); "
            "choose another folder or use --force to replace them"
        )
    extra = {"ppcasortScore": result.final_scores, "ppcasortRound": result.removal_round}
    written: dict[str, list[Path]] = {}
    for name, mask in (("kept", kept_mask), ("rejected", ~kept_mask)):
        written[name] = write_particles(particles, np.flatnonzero(mask), out_dir, name, extra_columns=extra) if mask.any() else []

    names = _image_names(particles)
    written["scores"] = [_write_atomically(out_dir / "scores.csv", lambda f: _write_scores(f, result, kept_mask, names))]
    parameters = {
        "input": str(Path(particles.path).resolve()) if getattr(particles, "path", None) else None,
        "n_particles": int(result.n_total),
        "n_kept": int(kept_mask.sum()),
        "settings": settings.to_dict(),
        "rounds": int(result.round),
        "em_iterations": int(result.n_iterations),
        "final_log_likelihood": float(result.log_likelihood[-1]) if result.log_likelihood.size else None,
    }
    written["parameters"] = [
        _write_atomically(out_dir / "parameters.json", lambda f: json.dump(parameters, f, indent=2))
    ]
    return written


def _image_names(particles) -> list[str] | None:
    table = getattr(particles, "table", None)
    if table is not None and "rlnImageName" in table.columns:
        return [str(v) for v in table["rlnImageName"]]
    return None


def _write_scores(handle, result: SortRound, kept_mask: np.ndarray, names: list[str] | None) -> None:
    writer = csv.writer(handle)
    writer.writerow(["index", "image_name", "score", "removal_round", "kept"])
    for i in range(result.n_total):
        writer.writerow([i, names[i] if names else "", repr(float(result.final_scores[i])),
                         int(result.removal_round[i]), int(kept_mask[i])])


def _write_atomically(path: Path, write: Callable) -> Path:
    """Write a text file through a temporary name in the same folder, then rename it into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
