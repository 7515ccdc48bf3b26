"""The contrast transfer function (CTF): its formula, the CTF of each particle from its metadata, and its signs
for phase flipping.

Every image of a micrograph is the object's projection filtered by the micrograph's CTF, whose sign
alternates between the Thon rings. Two views of one particle at different defoci therefore differ more
than the particle does; flipping the phases where the CTF is negative (multiplying the spectrum by the
sign of the CTF, the correction ASPIRE and early RELION apply before classification) makes the images of
one particle agree at every defocus, with the noise unchanged. The per-particle CTF comes from the
particle file: RELION's rlnDefocusU/V/Angle (+ rlnPhaseShift) with the optics group's voltage, Cs and
amplitude contrast, or cryoSPARC's ``ctf/*`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

__all__ = [
    "VOLTAGE_KV",
    "SPHERICAL_ABERRATION_MM",
    "AMPLITUDE_CONTRAST",
    "electron_wavelength_angstrom",
    "ctf_at",
    "CTFParameters",
    "ctf_parameters",
]

# The microscope of the simulators and the default of every CTF here: a 300 kV microscope with Cs 2.7 mm.
VOLTAGE_KV = 300.0
SPHERICAL_ABERRATION_MM = 2.7
AMPLITUDE_CONTRAST = 0.1


def electron_wavelength_angstrom(voltage_kv):
    """Relativistic electron wavelength in angstrom for an acceleration voltage in kV (scalar or array)."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    wavelength = 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))
    return float(wavelength) if wavelength.ndim == 0 else wavelength


def ctf_at(
    frequency_x,
    frequency_y,
    defocus_u_um,
    defocus_v_um=None,
    defocus_angle_deg=0.0,
    b_factor: float = 0.0,
    voltage_kv: float = VOLTAGE_KV,
    cs_mm: float = SPHERICAL_ABERRATION_MM,
    amplitude_contrast: float = AMPLITUDE_CONTRAST,
    phase_shift_deg=0.0,
) -> np.ndarray:
    """CTF with astigmatism, phase shift and B-factor envelope at spatial frequencies (kx, ky) in 1/angstrom.

    RELION's convention (ctf.h, CTF::getCTF and getDeltaF): with k = |(kx, ky)| and theta = atan2(ky, kx),

        df(theta) = (U + V) / 2 + (U - V) / 2 * cos(2 * (theta - angle))
        CTF(k)    = sin(pi * lambda * df(theta) * k^2 - pi/2 * Cs * lambda^3 * k^4 + arcsin(A) + phase)
                    * exp(-B * k^2 / 4)

    U, V: defocus in micrometres (positive = underfocus), U along the direction ``defocus_angle_deg``
    (degrees from the +x axis, i.e. image columns, towards +y, i.e. increasing row index), V across it;
    B: B-factor in angstrom^2; lambda: electron wavelength; Cs: spherical aberration; A: amplitude
    contrast; phase: the phase-plate shift in degrees. CTF(0) = A > 0 without a phase shift (a positive
    potential gives positive low-frequency contrast).

    ``frequency_x``, ``frequency_y`` and the CTF parameters broadcast against each other (e.g. (n, 1, 1)
    defoci on an (h, w) grid give n CTFs); returns float32 of the broadcast shape.
    """
    frequency_x = np.asarray(frequency_x, dtype=np.float32)  # float32: phase errors below 1e-4 rad
    frequency_y = np.asarray(frequency_y, dtype=np.float32)
    squared = frequency_x**2 + frequency_y**2
    if defocus_v_um is None or np.array_equal(defocus_v_um, defocus_u_um):
        defocus = np.asarray(defocus_u_um, dtype=np.float64)
    else:
        defocus_u = np.asarray(defocus_u_um, dtype=np.float32)
        defocus_v = np.asarray(defocus_v_um, dtype=np.float32)
        mean, half_difference = np.float32(0.5) * (defocus_u + defocus_v), np.float32(0.5) * (defocus_u - defocus_v)
        direction = np.arctan2(frequency_y, frequency_x) - np.deg2rad(np.asarray(defocus_angle_deg, np.float32))
        defocus = mean + half_difference * np.cos(2 * direction)
    return _ctf_values(squared, defocus, voltage_kv, cs_mm, amplitude_contrast, b_factor, phase_shift_deg)


def _phase_terms(voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The microscope's terms of the CTF phase chi = D df k^2 - S k^4 + c (see ``ctf_at``), float64 arrays of the
    parameters' broadcast shape: D = pi lambda (per micrometre of defocus and 1/angstrom^2), S = pi/2 Cs lambda^3
    (per 1/angstrom^4) and c = arcsin(A) + phase (radians). ValueError for an amplitude contrast outside [0, 1) or a
    voltage that is not positive."""
    amplitude_contrast = np.asarray(amplitude_contrast, dtype=np.float64)
    voltage_kv = np.asarray(voltage_kv, dtype=np.float64)
    if not np.all((amplitude_contrast >= 0) & (amplitude_contrast < 1)):
        raise ValueError(f"amplitude contrast must be in [0, 1), got {amplitude_contrast!r}")
    if not np.all(voltage_kv > 0):
        raise ValueError(f"voltage must be positive, got {voltage_kv!r}")
    wavelength = np.asarray(electron_wavelength_angstrom(voltage_kv))
    return (np.pi * wavelength * 1e4, 0.5 * np.pi * 1e7 * np.asarray(cs_mm, dtype=np.float64) * wavelength**3,
            np.arcsin(amplitude_contrast) + np.deg2rad(np.asarray(phase_shift_deg, dtype=np.float64)))


def _ctf_values(
    squared_frequency: np.ndarray,
    defocus_um: np.ndarray,
    voltage_kv=VOLTAGE_KV,
    cs_mm=SPHERICAL_ABERRATION_MM,
    amplitude_contrast=AMPLITUDE_CONTRAST,
    b_factor: float = 0.0,
    phase_shift_deg=0.0,
) -> np.ndarray:
    """CTF (see ``ctf_at``) at squared frequencies (1/angstrom^2) and defoci (micrometres) that broadcast
    against each other and against the microscope parameters (e.g. (n, 1) defoci on (1, m) frequencies):
    float32 of the broadcast shape."""
    if not (np.isfinite(b_factor) and b_factor >= 0):
        raise ValueError(f"B-factor must be a non-negative number of angstrom^2, got {b_factor!r}")
    defocus_scale, spherical_term, constant = _phase_terms(voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg)
    defocus_term = defocus_scale * np.asarray(defocus_um, dtype=np.float64)  # per 1/angstrom^2
    k2 = np.asarray(squared_frequency, dtype=np.float32)
    phase = defocus_term.astype(np.float32) * k2
    phase -= spherical_term.astype(np.float32) * k2**2 - constant.astype(np.float32)
    values = np.sin(phase, out=phase)
    if b_factor:
        values *= np.exp(np.float32(-0.25 * b_factor) * k2)
    return values


@dataclass(frozen=True)
class CTFParameters:
    """The CTF of every particle of a set (arrays of shape (N,), particle order).

    defocus_u_um, defocus_v_um: defocus along and across the astigmatism direction, micrometres.
    defocus_angle_deg: astigmatism direction, degrees (``ctf_at`` convention).
    phase_shift_deg: phase-plate shift, degrees (0 without a phase plate).
    voltage_kv, cs_mm, amplitude_contrast: the microscope of each particle's optics group.
    pixel_size: angstrom per pixel of the particle images as stored.
    """

    defocus_u_um: np.ndarray
    defocus_v_um: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size: float

    def signs(self, indices, box: int, pixel_size: float) -> np.ndarray:
        """sign(CTF) of the particles ``indices`` on the rfft2 grid of ``box`` px images of ``pixel_size``
        angstrom (``scipy.fft.rfft2`` layout, zero frequency at [0, 0]): (n, box, box // 2 + 1) float32 of +-1.

        The phase of ``ctf_at`` is linear in five functions of the frequency, with cos(2 (theta - angle)) =
        cos 2theta cos 2angle + sin 2theta sin 2angle:
        chi = pi lambda [m k^2 + h cos 2angle (kx^2 - ky^2) + h sin 2angle (2 kx ky)] - pi/2 Cs lambda^3 k^4 + c,
        with m = (U + V) / 2, h = (U - V) / 2 and c = arcsin(A) + phase: one (n, 5) x (5, pixels) product gives
        every particle's phase (the B-factor envelope does not change the sign).
        """
        indices = np.asarray(indices)
        ky = scipy.fft.fftfreq(box, d=pixel_size)[:, None]
        kx = scipy.fft.rfftfreq(box, d=pixel_size)[None, :]
        squared = kx**2 + ky**2
        grid = np.stack([squared, kx**2 - ky**2, 2 * kx * ky, squared**2, np.ones_like(squared)]).reshape(5, -1)

        def column(values):
            return np.asarray(values, dtype=np.float64)[indices]

        defocus_term, spherical_term, constant = _phase_terms(
            column(self.voltage_kv), column(self.cs_mm), column(self.amplitude_contrast), column(self.phase_shift_deg))
        mean = 0.5 * (column(self.defocus_u_um) + column(self.defocus_v_um))
        half_difference = 0.5 * (column(self.defocus_u_um) - column(self.defocus_v_um))
        angle = 2 * np.deg2rad(column(self.defocus_angle_deg))
        terms = np.stack([defocus_term * mean, defocus_term * half_difference * np.cos(angle),
                          defocus_term * half_difference * np.sin(angle), -spherical_term, constant], axis=1)
        phase = (terms.astype(np.float32) @ grid.astype(np.float32)).reshape(indices.size, *squared.shape)
        values = np.sin(phase, out=phase)
        return np.where(values < 0, np.float32(-1), np.float32(1))


#: RELION labels of the per-particle CTF, and their units' factor to micrometres or degrees.
_RELION_FIELDS = {"defocus_u_um": ("rlnDefocusU", 1e-4), "defocus_v_um": ("rlnDefocusV", 1e-4),
                  "defocus_angle_deg": ("rlnDefocusAngle", 1.0), "phase_shift_deg": ("rlnPhaseShift", 1.0)}
_RELION_MICROSCOPE = {"voltage_kv": "rlnVoltage", "cs_mm": "rlnSphericalAberration",
                      "amplitude_contrast": "rlnAmplitudeContrast"}
#: cryoSPARC fields of the per-particle CTF and their factor to micrometres or degrees.
_CS_FIELDS = {"defocus_u_um": ("ctf/df1_A", 1e-4), "defocus_v_um": ("ctf/df2_A", 1e-4),
              "defocus_angle_deg": ("ctf/df_angle_rad", 180 / np.pi), "phase_shift_deg": ("ctf/phase_shift_rad", 180 / np.pi),
              "voltage_kv": ("ctf/accel_kv", 1.0), "cs_mm": ("ctf/cs_mm", 1.0),
              "amplitude_contrast": ("ctf/amp_contrast", 1.0)}


def ctf_parameters(particles) -> CTFParameters | None:
    """The CTF of every particle of ``particles`` from its metadata, or None when it has none (a bare stack,
    no defocus columns, no pixel size, or values that are not finite).

    RELION: rlnDefocusU/V (angstrom) and rlnDefocusAngle per particle, rlnPhaseShift if present; voltage, Cs
    and amplitude contrast from the particle's optics group (RELION >= 3.1) or its own row (3.0).
    cryoSPARC: the ``ctf/*`` fields. The pixel size is the set's.
    """
    table = getattr(particles, "table", None)
    pixel_size = getattr(particles, "pixel_size", None)
    if table is None or not pixel_size:
        return None
    values: dict[str, np.ndarray] = {}
    if getattr(particles, "kind", None) == "cs":
        if not all(field in table.columns for field, _ in
                   (_CS_FIELDS[name] for name in ("defocus_u_um", "defocus_v_um", "voltage_kv", "cs_mm",
                                                  "amplitude_contrast"))):
            return None
        for name, (field, factor) in _CS_FIELDS.items():
            values[name] = (table[field].to_numpy(np.float64) * factor if field in table.columns
                            else np.zeros(len(table)))
    else:
        if "rlnDefocusU" not in table.columns:
            return None
        for name, (label, factor) in _RELION_FIELDS.items():
            if label in table.columns:
                values[name] = table[label].to_numpy(np.float64) * factor
        values.setdefault("defocus_v_um", values["defocus_u_um"])
        values.setdefault("defocus_angle_deg", np.zeros(len(table)))
        values.setdefault("phase_shift_deg", np.zeros(len(table)))
        microscope = _relion_microscope(table, getattr(particles, "optics", None))
        if microscope is None:
            return None
        values.update(microscope)
    if not all(np.all(np.isfinite(array)) for array in values.values()):
        return None
    return CTFParameters(pixel_size=float(pixel_size), **values)


def _relion_microscope(table, optics) -> dict[str, np.ndarray] | None:
    """Voltage, Cs and amplitude contrast of each particle: from its own row, else from its optics group."""
    values = {}
    for name, label in _RELION_MICROSCOPE.items():
        if label in table.columns:
            values[name] = table[label].to_numpy(np.float64)
        elif optics is not None and label in optics.columns and "rlnOpticsGroup" in optics.columns \
                and "rlnOpticsGroup" in table.columns:
            by_group = dict(zip(optics["rlnOpticsGroup"].to_numpy(), optics[label].to_numpy(np.float64)))
            try:
                values[name] = np.array([by_group[group] for group in table["rlnOpticsGroup"].to_numpy()])
            except KeyError:
                return None
        else:
            return None
    return values
