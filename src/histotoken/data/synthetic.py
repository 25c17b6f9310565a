"""A synthetic BreakHis: procedurally drawn H&E-like tissue in the exact BreakHis layout.

The images are synthetic. They exist so that the demo, the tests and anyone checking a
pipeline have a data set with the properties that matter to histotoken's code paths:

- the BreakHis folder layout and file names (8 subtypes, patients, 4 magnifications);
- a subtype signal that is learnable (each subtype has its own tissue architecture) and a
  benign/malignant signal (nuclear size, pleomorphism, no myoepithelial layer);
- a real cross-magnification shift: everything is drawn in micrometres and the field of
  view shrinks as magnification grows (40x shows 10x the width of 400x), so nuclei and
  glands are larger in pixels, and fewer of them fit in a frame, at 400x than at 40x;
- patient effects (stain colour and tissue character vary per patient), so that
  patient-disjoint splits matter;
- one patient id under two subtypes, as BreakHis's 14-13412.

How an image is made: the tissue is a set of density maps in micrometre coordinates
(hematoxylin in nuclei and mucin, eosin in stroma and cytoplasm, empty lumens/spaces);
nuclei are ellipses placed by subtype-specific rules (gland rings, sheets, single files,
clusters, frond linings). Colour comes from Beer-Lambert mixing of two stain vectors
(Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001; Macenko et al., ISBI 2009),
jittered per patient, followed by a little blur and sensor noise. Smooth random fields use Fourier (spectral) synthesis,
nuclei a nearest-seed distance transform, so drawing is vectorised numpy/scipy.

Every image gets its own random generator seeded by ``(seed, subtype, patient,
magnification, seq)``, so files do not depend on generation order and the same
parameters give byte-identical files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import multiprocessing
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

from histotoken.data.breakhis import (
    MAGNIFICATIONS,
    SUBTYPES,
    SYNTHETIC_MARKER,
    breakhis_image_path,
)
from histotoken.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"  # bump whenever the drawing changes: re-runs refuse to mix versions in a folder
# Field-of-view width in micrometres at 40x; at magnification m it is this times 40/m
# (about 1.8 mm at 40x and 0.18 mm at 400x, close to BreakHis's optics).
FIELD_WIDTH_UM_AT_40X = 1800.0
# BreakHis's own patient with images under two subtypes is 14-13412; the synthetic set
# repeats the situation with one generated id under these two subtypes.
SHARED_PATIENT_SUBTYPES: tuple[str, str] = ("ductal_carcinoma", "lobular_carcinoma")
SYNTHETIC_NOTE = (
    "These images are synthetic: procedurally drawn H&E-like tissue made by histotoken for "
    "demos, tests and pipeline checks. They are not pathology data; no result obtained on "
    "them says anything about real tissue or real models' clinical performance."
)
MIN_SIDE, MAX_SIDE = 16, 4096

# Optical-density stain vectors (R, G, B) of hematoxylin and eosin, between the vectors
# of Ruifrok & Johnston (2001) and the reference ones used with Macenko et al. (2009).
_HEMATOXYLIN = np.array([0.60, 0.71, 0.37])
_EOSIN = np.array([0.13, 0.89, 0.43])

ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_synthetic_breakhis` left in ``out``."""

    out: Path
    n_images: int
    n_patients: int  # distinct patient ids (the shared id counts once)
    seconds: float
    created: int = 0  # images written by this call; 0 when the set was already complete


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def generate_synthetic_breakhis(
    out: str | Path,
    patients_per_class: int = 3,
    images_per_patient: int = 4,
    magnifications: Sequence[int] = MAGNIFICATIONS,
    size: tuple[int, int] = (700, 460),
    seed: int = 0,
    progress: ProgressCallback | None = None,
    workers: int = 1,
) -> SyntheticSummary:
    """Write a synthetic BreakHis below ``out`` and return a summary.

    ``images_per_patient`` images are drawn per patient and magnification; ``size`` is
    (width, height) in pixels. ``out`` must be missing, empty, or a synthetic set made
    earlier with the same parameters: then missing images are completed, and a complete set
    is left untouched. Any other non-empty folder, or a set made with other parameters,
    raises ValueError. ``progress(done, total)`` is called after every image. ``workers``
    processes draw images in parallel; the files are the same for any number of workers.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    parameters = _check_parameters(patients_per_class, images_per_patient, magnifications, size, seed)
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    patients = make_patient_ids(seed, patients_per_class)
    jobs = [
        _ImageJob(tumor_class, patient_index, patient_id, magnification, seq)
        for tumor_class in SUBTYPES
        for patient_index, patient_id in enumerate(patients[tumor_class])
        for magnification in parameters["magnifications"]
        for seq in range(1, images_per_patient + 1)
    ]
    n_patients = len({pid for ids in patients.values() for pid in ids})
    marker = _marker_content(parameters, patients, len(jobs))

    _prepare_folder(out, marker)
    todo = [job for job in jobs if not job.path(out).is_file()]
    if not todo:
        if not _read_marker(out).get("complete"):  # stopped between the last image and the marker
            atomic_write_json(out / SYNTHETIC_MARKER, {**marker, "complete": True})
        logger.info("%s already holds this synthetic set (%d images); nothing written", out, len(jobs))
        return SyntheticSummary(out, len(jobs), n_patients, time.perf_counter() - started, created=0)
    if len(todo) < len(jobs):
        logger.info("completing the synthetic set in %s: %d of %d images missing", out, len(todo), len(jobs))
    # The marker goes first, so that an interrupted run leaves a folder that a re-run recognises.
    atomic_write_json(out / SYNTHETIC_MARKER, {**marker, "complete": False})
    draw = functools.partial(_draw_and_write, out=out, size=tuple(parameters["size"]), seed=seed)
    done = len(jobs) - len(todo)
    for _ in _map(draw, todo, workers):
        done += 1
        if progress is not None:
            progress(done, len(jobs))
    atomic_write_json(out / SYNTHETIC_MARKER, {**marker, "complete": True})
    return SyntheticSummary(out, len(jobs), n_patients, time.perf_counter() - started, created=len(todo))


def _map(function: Callable, items: list, workers: int):
    """``map`` in this process, or over a pool of ``workers`` processes (results in order)."""
    if workers == 1 or len(items) < 2:
        yield from map(function, items)
        return
    # fork on Linux: no re-import of torch in every worker (as torch's DataLoader does)
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=context) as pool:
        yield from pool.map(function, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


def _draw_and_write(job: _ImageJob, out: Path, size: tuple[int, int], seed: int) -> None:
    rgb = render_image(
        job.tumor_class, job.magnification, size, seed, job.patient_index, job.patient_id, job.seq
    )
    _write_png(job.path(out), rgb)


@dataclasses.dataclass(frozen=True)
class _ImageJob:
    tumor_class: str
    patient_index: int
    patient_id: str
    magnification: int
    seq: int

    def path(self, root: Path) -> Path:
        return breakhis_image_path(root, self.tumor_class, self.patient_id, self.magnification, self.seq)


def _check_parameters(
    patients_per_class: int,
    images_per_patient: int,
    magnifications: Sequence[int],
    size: tuple[int, int],
    seed: int,
) -> dict:
    if int(patients_per_class) != patients_per_class or patients_per_class < 1:
        raise ValueError(f"patients_per_class must be a whole number >= 1, got {patients_per_class!r}")
    if int(images_per_patient) != images_per_patient or not 1 <= images_per_patient <= 999:
        raise ValueError(
            f"images_per_patient must be a whole number from 1 to 999, got {images_per_patient!r}"
        )
    mags = sorted({int(m) for m in magnifications})
    unknown = [m for m in mags if m not in MAGNIFICATIONS]
    if not mags or unknown:
        raise ValueError(
            f"magnifications must be a non-empty subset of {', '.join(map(str, MAGNIFICATIONS))}, "
            f"got {', '.join(map(str, magnifications)) or 'nothing'}"
        )
    width, height = (int(v) for v in size)
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(
            f"size must be WIDTHxHEIGHT with both sides from {MIN_SIDE} to {MAX_SIDE}, got {width}x{height}"
        )
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    return {
        "patients_per_class": int(patients_per_class),
        "images_per_patient": int(images_per_patient),
        "magnifications": mags,
        "size": [width, height],
        "seed": int(seed),
    }


# ----------------------------------------------------------------------------------------
# Patient ids and the marker file
# ----------------------------------------------------------------------------------------


def make_patient_ids(seed: int, patients_per_class: int) -> dict[str, list[str]]:
    """BreakHis-like patient ids (``<YY>-<ID>``, e.g. ``14-22549AB``) per subtype.

    Ids are unique and depend only on ``seed`` and ``patients_per_class``, except that with
    two or more patients per class the last patient of the second subtype in
    :data:`SHARED_PATIENT_SUBTYPES` reuses the id of the last patient of the first one, as
    BreakHis's 14-13412 appears under two subtypes. Every subtype keeps at least one id of
    its own.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    seen: set[str] = set()
    ids: dict[str, list[str]] = {}
    for tumor_class in SUBTYPES:
        ids[tumor_class] = []
        while len(ids[tumor_class]) < patients_per_class:
            candidate = _random_patient_id(rng)
            if candidate not in seen:
                seen.add(candidate)
                ids[tumor_class].append(candidate)
    if patients_per_class >= 2:
        first, second = SHARED_PATIENT_SUBTYPES
        ids[second][-1] = ids[first][-1]
    return ids


def _random_patient_id(rng: np.random.Generator) -> str:
    year = int(rng.choice([13, 14, 15], p=[0.15, 0.7, 0.15]))
    number = int(rng.integers(100, 30000))
    n_letters = int(rng.choice([0, 1, 2, 4], p=[0.6, 0.1, 0.25, 0.05]))
    first = int(rng.integers(0, 26 - n_letters + 1)) if n_letters else 0
    letters = "".join(chr(ord("A") + first + k) for k in range(n_letters))  # consecutive, as "AB", "CDEF"
    return f"{year}-{number}{letters}"


def _marker_content(parameters: dict, patients: dict[str, list[str]], n_images: int) -> dict:
    width, height = parameters["size"]
    shared = None
    if parameters["patients_per_class"] >= 2:
        shared = {
            "patient_id": patients[SHARED_PATIENT_SUBTYPES[0]][-1],
            "tumor_classes": list(SHARED_PATIENT_SUBTYPES),
        }
    return {
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "generator": "histotoken.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "n_images": n_images,
        "field_of_view_um": {
            str(m): [round(field_width_um(m), 1), round(field_width_um(m) * height / width, 1)]
            for m in parameters["magnifications"]
        },
        "patients": patients,
        "shared_patient": shared,
    }


def field_width_um(magnification: int) -> float:
    """Physical width of the field of view, in micrometres, at a magnification."""
    return FIELD_WIDTH_UM_AT_40X * 40.0 / magnification


def _prepare_folder(out: Path, marker: dict) -> None:
    """Accept a missing or empty folder, or an earlier synthetic set with the same parameters."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{out} exists and is not a folder; give a new or empty folder for the synthetic set"
        )
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    if not (out / SYNTHETIC_MARKER).is_file():
        raise ValueError(
            f"{out} is not empty and is not a synthetic set (no {SYNTHETIC_MARKER}); refusing to write "
            "into it. Give a new or empty folder."
        )
    existing = _read_marker(out)
    before = {"generator_version": existing.get("generator_version"), **(existing.get("parameters") or {})}
    now = {"generator_version": marker["generator_version"], **marker["parameters"]}
    if before != now:
        differences = "; ".join(
            f"{key} {_show(key, before.get(key))} there, {_show(key, now.get(key))} asked"
            for key in now
            if before.get(key) != now.get(key)
        )
        raise ValueError(
            f"{out} holds a synthetic set made with other parameters ({differences}). "
            "Pick another folder for these parameters (or delete this one first)."
        )


def _read_marker(out: Path) -> dict:
    path = out / SYNTHETIC_MARKER
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); give a new or empty folder") from error
    if not isinstance(content, dict) or not isinstance(content.get("parameters", {}), dict):
        raise ValueError(f"{path} is not a histotoken synthetic-set marker; give a new or empty folder")
    return content


def _show(key: str, value: object) -> str:
    if key == "size" and isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())  # never a half-written PNG under its real name


# ----------------------------------------------------------------------------------------
# Rendering one image
# ----------------------------------------------------------------------------------------


def render_image(
    tumor_class: str,
    magnification: int,
    size: tuple[int, int],
    seed: int,
    patient_index: int,
    patient_id: str,
    seq: int,
) -> np.ndarray:
    """Draw one synthetic H&E image, ``(height, width, 3)`` uint8.

    The image's generator comes from ``(seed, subtype, patient_index, magnification, seq)``;
    the patient's tissue character from ``(seed, subtype, patient_index)``; the patient's stain
    from ``(seed, patient_id)`` (so a patient id shared by two subtypes has one stain).
    """
    class_index = SUBTYPES.index(tumor_class)
    width, height = size
    image_rng = np.random.default_rng(
        np.random.SeedSequence([seed, 3, class_index, patient_index, magnification, seq])
    )
    style = _PatientStyle.draw(
        np.random.default_rng(np.random.SeedSequence([seed, 1, class_index, patient_index]))
    )
    stain = _Stain.draw(
        np.random.default_rng(np.random.SeedSequence([seed, 2, zlib.crc32(patient_id.encode())]))
    )
    canvas = _Canvas(width, height, field_width_um(magnification) / width, image_rng, style)
    return _compose(canvas, _photographed_field(canvas, _LAYOUTS[tumor_class]), stain)


def _photographed_field(canvas: _Canvas, layout: Callable[[_Canvas], _Tissue], tries: int = 4) -> _Tissue:
    """Draw the tissue again (up to ``tries`` times) while the frame is mostly empty or has no cells.

    BreakHis images are fields a pathologist chose, so they show tissue: at 400x a random
    frame can fall inside a cystic space or a mucin lake. The first acceptable drawing is
    kept, else the one with the most cells (all from the image's own generator, so this
    stays deterministic).
    """
    best, best_cells = None, -1.0
    for _ in range(tries):
        tissue = layout(canvas)
        nuclei = tissue.nuclei
        inside = (
            (nuclei.x >= 0) & (nuclei.x < canvas.width_um) & (nuclei.y >= 0) & (nuclei.y < canvas.height_um)
        )
        cells = float(np.sum(np.pi * nuclei.a[inside] * nuclei.b[inside])) / (
            canvas.width_um * canvas.height_um
        )
        if cells >= 0.015 and float(np.mean(tissue.empty)) <= 0.6:
            return tissue
        if cells > best_cells:
            best, best_cells = tissue, cells
    return best


@dataclasses.dataclass(frozen=True)
class _PatientStyle:
    """Per-patient tissue character: multipliers on structure size, cellularity, nuclear size."""

    structure_scale: float
    cellularity: float
    nuclear_scale: float
    stroma_density: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _PatientStyle:
        return cls(
            structure_scale=float(rng.uniform(0.8, 1.25)),
            cellularity=float(rng.uniform(0.8, 1.2)),
            nuclear_scale=float(rng.uniform(0.9, 1.12)),
            stroma_density=float(rng.uniform(0.8, 1.15)),
        )


@dataclasses.dataclass(frozen=True)
class _Stain:
    """Per-patient staining: jittered stain vectors, stain amounts and the glass colour."""

    hematoxylin: np.ndarray
    eosin: np.ndarray
    h_amount: float
    e_amount: float
    background: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Stain:
        def jitter(vector: np.ndarray, spread: float) -> np.ndarray:
            moved = np.abs(vector + rng.normal(0.0, spread, 3))
            return moved / np.linalg.norm(moved)

        return cls(
            hematoxylin=jitter(_HEMATOXYLIN, 0.04),
            eosin=jitter(_EOSIN, 0.035),
            h_amount=float(rng.uniform(0.85, 1.18)),
            e_amount=float(rng.uniform(0.85, 1.22)),
            background=np.clip(rng.normal(0.96, 0.01, 3), 0.92, 1.0),
        )


class _Columns:
    """A dataclass whose fields are equally long 1-D arrays (one row per object)."""

    def subset(self, keep: np.ndarray):
        return type(self)(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

    def __add__(self, other):
        fields = dataclasses.fields(self)
        return type(self)(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields))


@dataclasses.dataclass
class _Nuclei(_Columns):
    """Elliptical nuclei in micrometres: centre, semi-axes a >= b, angle, darkness, rim, nucleolus."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    dark: np.ndarray
    rim: np.ndarray
    nucleolus: np.ndarray

    @classmethod
    def empty(cls) -> _Nuclei:
        return cls(*(np.zeros(0) for _ in range(8)))

    @classmethod
    def make(
        cls, rng: np.random.Generator, x, y, a, ratio, angle=None, dark=1.4, rim=0.2, nucleolus=0.0
    ) -> _Nuclei:
        n = len(x)

        def full(value) -> np.ndarray:  # a scalar or an array -> an array of n floats
            return np.broadcast_to(np.asarray(value, dtype=float), (n,)).copy()

        a = full(a)
        angle = rng.uniform(0, np.pi, n) if angle is None else full(angle)
        return cls(
            np.asarray(x, float),
            np.asarray(y, float),
            a,
            a / full(ratio),
            angle,
            full(dark),
            full(rim),
            full(nucleolus),
        )


@dataclasses.dataclass
class _Tissue:
    """Density maps (height, width) in stain units, plus the nuclei to draw on top."""

    eosin: np.ndarray
    hematoxylin: np.ndarray
    empty: np.ndarray  # 0 tissue .. 1 lumen/space (no stain)
    nuclei: _Nuclei


class _Canvas:
    """The pixel grid of one image in micrometres, its random generator and the patient's style."""

    def __init__(
        self, width: int, height: int, um_per_px: float, rng: np.random.Generator, style: _PatientStyle
    ):
        self.width, self.height, self.um, self.rng, self.style = width, height, um_per_px, rng, style
        self.width_um, self.height_um = width * um_per_px, height * um_per_px
        self.x = ((np.arange(width) + 0.5) * um_per_px).astype(np.float32)[None, :]  # (1, W) µm
        self.y = ((np.arange(height) + 0.5) * um_per_px).astype(np.float32)[:, None]  # (H, 1) µm

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def noise(self, length_um: float, stretch: float = 1.0, angle: float = 0.0) -> np.ndarray:
        """Gaussian random field, unit variance, correlation length ``length_um``.

        ``stretch`` > 1 lengthens the correlation along ``angle`` (fibres, wisps).

        Spectral synthesis: white noise filtered by a Gaussian in the Fourier domain. The
        variance is normalised by the filter's theoretical value, not the sample's, so a field
        much larger than the frame is nearly constant across it (as a window into a big tissue
        region should be) instead of being stretched to fill it.
        """
        h, w = self.shape
        sigma_px = length_um / self.um
        fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
        fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
        if stretch == 1.0:  # isotropic: the filter is separable, (H, 1) x (1, W//2+1)
            gain = np.exp(-2 * np.pi**2 * sigma_px**2 * fy**2) * np.exp(-2 * np.pi**2 * sigma_px**2 * fx**2)
        else:
            along = fx * np.cos(angle) + fy * np.sin(angle)
            across = -fx * np.sin(angle) + fy * np.cos(angle)
            gain = np.exp(-2 * np.pi**2 * sigma_px**2 * ((stretch * along) ** 2 + across**2))
        # mean of gain^2 over the full (two-sided) spectrum: the half-spectrum columns that
        # stand for two columns of the full one count twice
        weight = np.full(fx.shape, 2.0, np.float32)
        weight[0, 0] = 1.0
        if w % 2 == 0:
            weight[0, -1] = 1.0
        variance = float(np.sum(gain**2 * weight, dtype=np.float64)) / (h * w)
        # uniform white noise with unit variance: cheaper than normal draws, and Gaussian
        # enough once filtered
        white = (self.rng.random(self.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(np.sqrt(12.0))
        field = scipy.fft.irfft2(scipy.fft.rfft2(white) * gain, s=self.shape)
        return (field / np.float32(np.sqrt(max(variance, 1e-12)))).astype(np.float32)

    def uniform_points(self, per_um2: float, margin_um: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Poisson points over the frame plus a margin (so structures cut by the edge are drawn)."""
        w, h = self.width_um + 2 * margin_um, self.height_um + 2 * margin_um
        n = int(self.rng.poisson(per_um2 * w * h))
        return self.rng.uniform(-margin_um, w - margin_um, n), self.rng.uniform(-margin_um, h - margin_um, n)

    def jittered_grid(
        self, spacing_um: float, jitter: float, margin_um: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """A hexagonal grid of points with random offset, orientation and per-point jitter (x spacing)."""
        reach = np.hypot(self.width_um, self.height_um) / 2 + margin_um + spacing_um
        n = int(np.ceil(reach / spacing_um))
        i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
        u = (i + 0.5 * (j % 2)) * spacing_um
        v = j * spacing_um * np.sqrt(3) / 2
        turn = self.rng.uniform(0, np.pi)
        cx, cy = self.width_um / 2, self.height_um / 2
        x = cx + u * np.cos(turn) - v * np.sin(turn) + self.rng.uniform(-0.5, 0.5) * spacing_um
        y = cy + u * np.sin(turn) + v * np.cos(turn) + self.rng.uniform(-0.5, 0.5) * spacing_um
        x = x.ravel() + self.rng.normal(0, jitter * spacing_um, x.size)
        y = y.ravel() + self.rng.normal(0, jitter * spacing_um, y.size)
        keep = (
            (x > -margin_um)
            & (x < self.width_um + margin_um)
            & (y > -margin_um)
            & (y < self.height_um + margin_um)
        )
        return x[keep], y[keep]

    def at(self, field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Values of a map at points (nearest pixel; points outside read the nearest edge)."""
        cols = np.clip((np.asarray(x) / self.um).astype(int), 0, self.width - 1)
        rows = np.clip((np.asarray(y) / self.um).astype(int), 0, self.height - 1)
        return field[rows, cols]

    def thin(self, probability: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep each point with the probability that a map gives at its place."""
        keep = self.rng.random(len(x)) < self.at(probability, x, y)
        return x[keep], y[keep]


def _soft_inside(
    distance: np.ndarray, minor_px: np.ndarray | float, area_px: np.ndarray | float
) -> np.ndarray:
    """Anti-aliased coverage of a shape from its normalised distance (1 on the boundary).

    ``(1 - d) * minor_px`` approximates the distance to the edge in pixels; shapes smaller
    than a pixel are limited to their area so that they darken a pixel in proportion.
    """
    coverage = np.clip(0.5 + (1.0 - distance) * np.maximum(minor_px, np.float32(0.5)), 0.0, 1.0)
    return coverage * np.minimum(np.float32(1.0), area_px)


# ----------------------------------------------------------------------------------------
# Building blocks shared by the subtypes
# ----------------------------------------------------------------------------------------


def _stroma(
    canvas: _Canvas, density: float, spindles_per_um2: float, fibre_angle: float, myxoid: float = 0.0
):
    """Collagen: eosin with fibre texture along ``fibre_angle``; spindle (fibroblast) nuclei along the fibres.

    Returns (eosin map, hematoxylin map, spindle nuclei).
    """
    rng, style = canvas.rng, canvas.style
    fibres = canvas.noise(2.0, stretch=6.0, angle=fibre_angle)
    patches = canvas.noise(60.0)
    eosin = density * style.stroma_density * (0.85 + 0.08 * fibres + 0.08 * patches)
    eosin = np.clip(eosin, 0.05, None)
    hematoxylin = np.full(canvas.shape, myxoid, np.float32) * (1 + 0.3 * patches)
    x, y = canvas.uniform_points(spindles_per_um2 * style.cellularity, margin_um=10)
    length = rng.uniform(5.0, 8.5, len(x)) * style.nuclear_scale
    spindles = _Nuclei.make(
        rng,
        x,
        y,
        length,
        rng.uniform(3.0, 4.5, len(x)),
        angle=fibre_angle + rng.normal(0, 0.25, len(x)),
        dark=rng.uniform(1.3, 1.7, len(x)),
        rim=0.05,
    )
    return eosin.astype(np.float32), hematoxylin.astype(np.float32), spindles


def _lymphocytes(canvas: _Canvas, per_um2: float, where: np.ndarray | None = None) -> _Nuclei:
    x, y = canvas.uniform_points(per_um2, margin_um=5)
    if where is not None:
        x, y = canvas.thin(where, x, y)
    r = canvas.rng.uniform(2.6, 3.3, len(x))
    return _Nuclei.make(
        canvas.rng, x, y, r, canvas.rng.uniform(1.0, 1.15, len(x)), dark=canvas.rng.uniform(1.8, 2.2, len(x))
    )


def _spread_out(x: np.ndarray, y: np.ndarray, min_distance: np.ndarray | float) -> np.ndarray:
    """Drop points closer than ``min_distance`` to an earlier point (greedy, vectorised by pairs)."""
    from scipy.spatial import cKDTree

    if len(x) < 2:
        return np.ones(len(x), bool)
    limit = float(np.max(min_distance))
    pairs = cKDTree(np.c_[x, y]).query_pairs(limit, output_type="ndarray")
    keep = np.ones(len(x), bool)
    if len(pairs):
        md = np.broadcast_to(np.asarray(min_distance, float), (len(x),))
        first, second = pairs[:, 0], pairs[:, 1]
        close = np.hypot(x[first] - x[second], y[first] - y[second]) < 0.5 * (md[first] + md[second])
        keep[np.maximum(first, second)[close]] = False
    return keep


@dataclasses.dataclass
class _Glands(_Columns):
    """Elliptical glands/ducts/cell balls: centre, semi-axes a >= b (µm), angle, lumen fraction."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    lumen: np.ndarray  # lumen semi-axes as a fraction of the gland's (0: solid)


def _draw_glands(canvas: _Canvas, glands: _Glands, warp: tuple[np.ndarray, np.ndarray] | None = None):
    """Rasterise glands: returns (outer coverage, lumen coverage).

    Glands that span only a few pixels are splatted (their area spread over the nearest
    pixels, all at once); larger ones are drawn one bounding-box slice each (a loop over
    glands, vectorised over pixels), so the cost follows the glands' area. ``warp`` (dx, dy
    maps in µm) bends them.
    """
    outer, lumen = canvas.zeros(), canvas.zeros()
    um = canvas.um
    tiny = glands.a / um < 1.0
    if tiny.any():
        x, y = glands.x[tiny], glands.y[tiny]
        if warp is not None:
            x, y = x - canvas.at(warp[0], x, y), y - canvas.at(warp[1], x, y)
        area = np.pi * glands.a[tiny] * glands.b[tiny]
        spread = max(0.35 * float(np.median(glands.b[tiny])) / um, 0.3)  # pixels
        outer += np.clip(ndimage.gaussian_filter(_splat(canvas, x, y, area), spread), 0, 1)
        lumen += np.clip(
            ndimage.gaussian_filter(_splat(canvas, x, y, area * glands.lumen[tiny] ** 2), spread), 0, 1
        )
    reach = 0.0 if warp is None else float(max(np.abs(warp[0]).max(), np.abs(warp[1]).max()))
    for k in np.nonzero(~tiny)[0]:
        a, b, angle, frac = glands.a[k], glands.b[k], glands.angle[k], glands.lumen[k]
        half = a + reach + 2 * um
        c0, c1 = int(max((glands.x[k] - half) / um, 0)), int(min((glands.x[k] + half) / um + 1, canvas.width))
        r0, r1 = (
            int(max((glands.y[k] - half) / um, 0)),
            int(min((glands.y[k] + half) / um + 1, canvas.height)),
        )
        if c0 >= c1 or r0 >= r1:
            continue
        dx = canvas.x[:, c0:c1] - glands.x[k]
        dy = canvas.y[r0:r1, :] - glands.y[k]
        if warp is not None:
            dx = dx + warp[0][r0:r1, c0:c1]
            dy = dy + warp[1][r0:r1, c0:c1]
        cos, sin = np.cos(angle), np.sin(angle)
        u = (dx * cos + dy * sin) / a
        v = (-dx * sin + dy * cos) / b
        d = np.sqrt(u * u + v * v)
        area = np.pi * a * b / um**2
        region = (slice(r0, r1), slice(c0, c1))
        np.maximum(outer[region], _soft_inside(d, b / um, area), out=outer[region])
        if frac > 0:
            inner = _soft_inside(d / frac, b * frac / um, area * frac**2)
            np.maximum(lumen[region], inner, out=lumen[region])
    return outer, lumen


def _ring_nuclei(
    canvas: _Canvas,
    glands: _Glands,
    radius: np.ndarray | float,
    spacing_um: float,
    size_um: float,
    ratio: float,
    dark: float,
    tangential: bool = False,
    rim: float = 0.2,
    warp: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Nuclei:
    """Nuclei on the ellipse at ``radius`` (fraction of each gland's semi-axes), evenly spaced.

    Columnar epithelial nuclei point along the gland's normal; myoepithelial ones
    (``tangential``) lie along the ring.
    """
    rng = canvas.rng
    if len(glands.x) == 0:
        return _Nuclei.empty()
    ring_a, ring_b = glands.a * radius, glands.b * radius
    perimeter = 2 * np.pi * np.sqrt((ring_a**2 + ring_b**2) / 2)
    counts = np.maximum(3, np.round(perimeter / spacing_um)).astype(int)
    owner = np.repeat(np.arange(len(glands.x)), counts)
    start = np.repeat(rng.uniform(0, 2 * np.pi, len(counts)), counts)
    position = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    t = start + 2 * np.pi * (position + rng.uniform(-0.2, 0.2, owner.size)) / counts[owner]
    ca, cb, angle = ring_a[owner], ring_b[owner], glands.angle[owner]
    lx, ly = ca * np.cos(t), cb * np.sin(t)
    x = glands.x[owner] + lx * np.cos(angle) - ly * np.sin(angle)
    y = glands.y[owner] + lx * np.sin(angle) + ly * np.cos(angle)
    if warp is not None:  # the pixel p shows gland point p + warp(p): draw at q - warp(q)
        x, y = x - canvas.at(warp[0], x, y), y - canvas.at(warp[1], x, y)
    normal = angle + np.arctan2(np.sin(t) / np.maximum(cb, 1e-6), np.cos(t) / np.maximum(ca, 1e-6))
    n = owner.size
    size = size_um * canvas.style.nuclear_scale * rng.uniform(0.88, 1.12, n)
    return _Nuclei.make(
        rng,
        x,
        y,
        size,
        ratio * rng.uniform(0.9, 1.1, n),
        angle=normal + (np.pi / 2 if tangential else 0.0),
        dark=dark * rng.uniform(0.9, 1.1, n),
        rim=rim,
    )


def _distance_to_contours(canvas: _Canvas, field: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Approximate distance in µm to the level lines of a smooth field: |f - c| / |grad f|."""
    gy, gx = np.gradient(field, canvas.um)
    slope = np.sqrt(gx * gx + gy * gy) + 1e-6
    gap = np.min(np.abs(field[None] - np.asarray(levels, np.float32)[:, None, None]), axis=0)
    return (gap / slope).astype(np.float32)


def _band(
    distance: np.ndarray, inner_um: np.ndarray | float, outer_um: np.ndarray | float, um: float
) -> np.ndarray:
    """Soft indicator of inner <= distance < outer (anti-aliased at pixel scale)."""
    rise = np.clip(0.5 + (distance - inner_um) / um, 0, 1)
    fall = np.clip(0.5 + (outer_um - distance) / um, 0, 1)
    return rise * fall


# ----------------------------------------------------------------------------------------
# The eight subtypes (benign first). Sizes in micrometres.
# ----------------------------------------------------------------------------------------


def _gland_tissue(
    canvas: _Canvas,
    glands: _Glands,
    stroma,
    *,
    nucleus_size: float,
    spacing: float,
    myoepithelium: bool,
    warp=None,
) -> _Tissue:
    """Glands with a ring of epithelial nuclei and an optional myoepithelial layer, set in stroma."""
    eosin, hematoxylin, spindles = stroma
    outer, lumen = _draw_glands(canvas, glands, warp)
    epithelium = np.clip(outer - lumen, 0, 1)
    stromal = 1 - outer
    x, y = spindles.x, spindles.y
    keep = canvas.rng.random(len(x)) < canvas.at(stromal, x, y)
    nuclei = spindles.subset(keep)
    ring = (glands.lumen + 1) / 2  # halfway between lumen and basement membrane
    nuclei = nuclei + _ring_nuclei(canvas, glands, ring, spacing, nucleus_size, 1.35, 1.35, warp=warp)
    if myoepithelium:
        nuclei = nuclei + _ring_nuclei(
            canvas,
            glands,
            0.96,
            spacing * 1.6,
            nucleus_size * 0.9,
            2.6,
            1.5,
            tangential=True,
            rim=0.0,
            warp=warp,
        )
    eosin = eosin * stromal + 0.38 * epithelium
    hematoxylin = hematoxylin * stromal + 0.07 * epithelium
    return _Tissue(eosin, hematoxylin, lumen, nuclei)


def _adenosis(canvas: _Canvas) -> _Tissue:
    """Many small round glands with open lumens, grouped in lobules, in pink stroma."""
    rng, style = canvas.rng, canvas.style
    radius = 20.0 * style.structure_scale
    x, y = canvas.uniform_points(1.0 / (2.3 * radius) ** 2, margin_um=2 * radius)
    lobules = 1 / (1 + np.exp(-(2.5 * canvas.noise(220.0) + 1.2)))
    x, y = canvas.thin(lobules, x, y)
    size = radius * rng.uniform(0.7, 1.3, len(x))
    keep = _spread_out(x, y, 2.05 * size)
    n = int(keep.sum())
    glands = _Glands(
        x[keep],
        y[keep],
        size[keep] * rng.uniform(1.0, 1.5, n),
        size[keep],
        rng.uniform(0, np.pi, n),
        rng.uniform(0.38, 0.55, n),
    )
    stroma = _stroma(canvas, 0.62, 1 / 900, rng.uniform(0, np.pi))
    return _gland_tissue(canvas, glands, stroma, nucleus_size=4.2, spacing=8.5, myoepithelium=True)


def _fibroadenoma(canvas: _Canvas) -> _Tissue:
    """Abundant pale, loose stroma with elongated, curved, slit-like ducts."""
    rng, style = canvas.rng, canvas.style
    scale = style.structure_scale
    x, y = canvas.uniform_points(1.0 / (120.0 * scale) ** 2, margin_um=250 * scale)
    n = len(x)
    length = rng.uniform(70, 230, n) * scale
    glands = _Glands(
        x, y, length, rng.uniform(10, 16, n) * scale, rng.uniform(0, np.pi, n), rng.uniform(0.22, 0.32, n)
    )
    keep = _spread_out(x, y, 0.55 * length)
    glands = glands.subset(keep)
    warp = (28 * canvas.noise(80.0), 28 * canvas.noise(80.0))
    stroma = _stroma(canvas, 0.34, 1 / 2200, rng.uniform(0, np.pi), myxoid=0.07)
    return _gland_tissue(canvas, glands, stroma, nucleus_size=4.0, spacing=8.0, myoepithelium=True, warp=warp)


def _phyllodes_tumor(canvas: _Canvas) -> _Tissue:
    """Leaf-like clefts lined by epithelium, in dense, very cellular spindle-cell stroma."""
    rng, style = canvas.rng, canvas.style
    shape_field = canvas.noise(140.0 * style.structure_scale)
    distance = _distance_to_contours(canvas, shape_field, (-1.2, -0.4, 0.4, 1.2))
    opening = 4.0 + 16.0 * np.clip(canvas.noise(70.0), 0, None)  # clefts widen into leaf-like spaces
    cleft = _band(distance, -1e9, opening, canvas.um)
    lining = _band(distance, opening, opening + 11.0, canvas.um)
    eosin, hematoxylin, _ = _stroma(canvas, 0.55, 0.0, rng.uniform(0, np.pi))
    near = np.exp(-distance / 60.0)  # stroma condenses around the clefts
    x, y = canvas.uniform_points(1 / 110 * style.cellularity, margin_um=10)
    x, y = canvas.thin(np.clip((0.45 + 0.55 * near) * (1 - cleft - lining), 0, 1), x, y)
    gx, gy = np.gradient(shape_field)
    along = canvas.at(np.arctan2(gy, gx), x, y) + np.pi / 2
    spindles = _Nuclei.make(
        rng,
        x,
        y,
        rng.uniform(5.0, 8.0, len(x)) * style.nuclear_scale,
        rng.uniform(2.4, 3.6, len(x)),
        angle=along + rng.normal(0, 0.3, len(x)),
        dark=rng.uniform(1.35, 1.75, len(x)),
        rim=0.1,
    )
    lx, ly = canvas.uniform_points(1 / 45, margin_um=10)
    lx, ly = canvas.thin(np.clip(lining * 1.2, 0, 1), lx, ly)
    keep = _spread_out(lx, ly, 7.0)
    lining_nuclei = _Nuclei.make(rng, lx[keep], ly[keep], 4.2 * style.nuclear_scale, 1.3, dark=1.4, rim=0.2)
    eosin = eosin * (1 - lining) + 0.38 * lining
    hematoxylin = hematoxylin + 0.07 * lining + 0.05 * near
    return _Tissue(eosin, hematoxylin, cleft, spindles + lining_nuclei)


def _tubular_adenoma(canvas: _Canvas) -> _Tissue:
    """Tightly packed small round tubules with small lumens and scant stroma."""
    rng, style = canvas.rng, canvas.style
    spacing = 44.0 * style.structure_scale
    x, y = canvas.jittered_grid(spacing, 0.07, margin_um=spacing)
    keep = rng.random(len(x)) > 0.06
    x, y = x[keep], y[keep]
    n = len(x)
    b = spacing * rng.uniform(0.36, 0.44, n)
    glands = _Glands(
        x, y, b * rng.uniform(1.0, 1.3, n), b, rng.uniform(0, np.pi, n), rng.uniform(0.18, 0.3, n)
    )
    stroma = _stroma(canvas, 0.55, 1 / 1500, rng.uniform(0, np.pi))
    return _gland_tissue(canvas, glands, stroma, nucleus_size=4.0, spacing=7.5, myoepithelium=True)


def _ductal_carcinoma(canvas: _Canvas) -> _Tissue:
    """Solid, irregular sheets and nests of large, pleomorphic, hyperchromatic nuclei."""
    rng, style = canvas.rng, canvas.style
    tumour = 1 / (1 + np.exp(-4.0 * (canvas.noise(110.0 * style.structure_scale) + 0.55)))
    eosin, hematoxylin, spindles = _stroma(canvas, 0.72, 1 / 2500, rng.uniform(0, np.pi))
    x, y = canvas.jittered_grid(15.0 / np.sqrt(style.cellularity), 0.22, margin_um=15)
    x, y = canvas.thin(tumour, x, y)
    n = len(x)
    size = 6.3 * style.nuclear_scale * rng.lognormal(0.0, 0.22, n)
    cells = _Nuclei.make(
        rng,
        x,
        y,
        size,
        rng.uniform(1.0, 1.7, n),
        dark=rng.uniform(1.0, 1.9, n),
        rim=rng.uniform(0.3, 0.7, n),
        nucleolus=np.where(rng.random(n) < 0.5, 0.9, 0.0),
    )
    cx, cy = canvas.uniform_points(1 / 160.0**2, margin_um=30)
    cx, cy = canvas.thin(np.clip(tumour * 1.5 - 0.6, 0, 1), cx, cy)
    r = rng.uniform(7, 20, len(cx))
    holes = _Glands(cx, cy, r, r, np.zeros(len(cx)), np.ones(len(cx)))  # cribriform spaces
    _, lumen = _draw_glands(canvas, holes)
    keep = rng.random(len(spindles.x)) < canvas.at(1 - tumour, spindles.x, spindles.y)
    spindles = spindles.subset(keep)
    nuclei = cells + spindles + _lymphocytes(canvas, 1 / 2500, where=1 - tumour)
    eosin = eosin * (1 - tumour) + 0.42 * tumour
    hematoxylin = hematoxylin * (1 - tumour) + 0.12 * tumour
    return _Tissue(eosin, hematoxylin, lumen, nuclei)


def _lobular_carcinoma(canvas: _Canvas) -> _Tissue:
    """Small, uniform, discohesive cells in single-file rows through dense collagen."""
    rng, style = canvas.rng, canvas.style
    fibre_angle = rng.uniform(0, np.pi)
    eosin, hematoxylin, spindles = _stroma(canvas, 0.7, 1 / 3000, fibre_angle)
    margin = 120.0
    sx, sy = canvas.uniform_points(1 / 75.0**2 * style.cellularity, margin_um=margin)
    xs, ys = [], []
    for x0, y0 in zip(sx, sy, strict=True):  # one file of cells per start point (loop over files, not pixels)
        steps = int(rng.integers(6, 30))
        heading = fibre_angle + rng.normal(0, 0.3) + np.cumsum(rng.normal(0, 0.12, steps))
        stride = rng.uniform(9.0, 11.5, steps)
        xs.append(x0 + np.cumsum(stride * np.cos(heading)))
        ys.append(y0 + np.cumsum(stride * np.sin(heading)))
    x = np.concatenate([*xs, np.zeros(0)])
    y = np.concatenate([*ys, np.zeros(0)])
    x2, y2 = canvas.uniform_points(1 / 1800, margin_um=5)  # scattered single cells
    x, y = np.r_[x, x2], np.r_[y, y2]
    n = len(x)
    cells = _Nuclei.make(
        rng,
        x + rng.normal(0, 1.0, n),
        y + rng.normal(0, 1.0, n),
        3.9 * style.nuclear_scale * rng.uniform(0.92, 1.08, n),
        rng.uniform(1.0, 1.25, n),
        dark=rng.uniform(1.55, 1.8, n),
        rim=0.05,
    )
    halo = ndimage.gaussian_filter(_splat(canvas, x, y, np.full(n, np.pi * 7.0**2)), 5.0 / canvas.um)
    halo = np.clip(halo, 0, 1)
    eosin = eosin * (1 - 0.45 * halo)
    return _Tissue(eosin, hematoxylin + 0.05 * halo, canvas.zeros(), cells + spindles)


def _mucinous_carcinoma(canvas: _Canvas) -> _Tissue:
    """Lakes of pale blue mucin, split by thin fibrous septa, with small floating tumour-cell clusters."""
    rng, style = canvas.rng, canvas.style
    wisps = canvas.noise(5.0, stretch=5.0, angle=rng.uniform(0, np.pi))
    mucin_h = 0.16 * (1 + 0.35 * wisps + 0.2 * canvas.noise(40.0))
    septa_distance = _distance_to_contours(canvas, canvas.noise(260.0), (-1.1, 0.0, 1.1))
    septa = _band(septa_distance, -1e9, 4.0 + 5.0 * np.clip(canvas.noise(60.0), 0, None), canvas.um)
    eosin_s, _, spindles = _stroma(canvas, 0.75, 1 / 700, rng.uniform(0, np.pi))
    keep = rng.random(len(spindles.x)) < canvas.at(septa, spindles.x, spindles.y)
    spindles = spindles.subset(keep)
    scale = style.structure_scale
    cx, cy = canvas.uniform_points(1 / (120.0 * scale) ** 2, margin_um=60)
    size = rng.uniform(14, 42, len(cx)) * scale
    keep = _spread_out(cx, cy, 2.4 * size) & (canvas.at(septa_distance, cx, cy) > size)
    n = int(keep.sum())
    clusters = _Glands(
        cx[keep],
        cy[keep],
        size[keep] * rng.uniform(1.0, 1.8, n),
        size[keep],
        rng.uniform(0, np.pi, n),
        np.where(rng.random(n) < 0.3, 0.3, 0.0),
    )
    ball, lumen = _draw_glands(canvas, clusters)
    px, py = canvas.jittered_grid(10.5, 0.18, margin_um=10)
    px, py = canvas.thin(np.clip((ball - lumen) * 1.3 - 0.2, 0, 1), px, py)
    m = len(px)
    cells = _Nuclei.make(
        rng,
        px,
        py,
        5.0 * style.nuclear_scale * rng.uniform(0.85, 1.2, m),
        rng.uniform(1.0, 1.35, m),
        dark=rng.uniform(1.2, 1.55, m),
        rim=0.35,
        nucleolus=np.where(rng.random(m) < 0.3, 0.6, 0.0),
    )
    mucin = (1 - septa) * (1 - ball)
    eosin = 0.04 * mucin + eosin_s * septa + 0.45 * ball * (1 - septa)
    hematoxylin = mucin_h * mucin + 0.1 * ball
    return _Tissue(eosin, hematoxylin, lumen * 0.8, cells + spindles)


def _papillary_carcinoma(canvas: _Canvas) -> _Tissue:
    """Branching finger-like fronds: a pink fibrovascular core lined by stratified columnar cells."""
    rng, style = canvas.rng, canvas.style
    scale = style.structure_scale
    core_r, lining_w = 14.0 * scale, 17.0 * scale
    reach = core_r + lining_w
    x0, y0, x1, y1 = _frond_skeleton(canvas)
    pad = int(np.ceil(reach / canvas.um)) + 2
    grid = np.ones((canvas.height + 2 * pad, canvas.width + 2 * pad), bool)  # False on the fronds' axes
    steps = (np.hypot(x1 - x0, y1 - y0) / (0.5 * canvas.um)).astype(int) + 2  # samples per segment
    owner = np.repeat(np.arange(len(x0)), steps)
    t = (np.arange(owner.size) - np.repeat(np.cumsum(steps) - steps, steps)) / (steps[owner] - 1)
    cols = ((x0[owner] + t * (x1 - x0)[owner]) / canvas.um + pad).astype(int)
    rows = ((y0[owner] + t * (y1 - y0)[owner]) / canvas.um + pad).astype(int)
    ok = (cols >= 0) & (cols < grid.shape[1]) & (rows >= 0) & (rows < grid.shape[0])
    grid[rows[ok], cols[ok]] = False
    if grid.all():
        distance = np.full(canvas.shape, 1e6, np.float32)
        normal = canvas.zeros()
    else:
        dist_px, (ri, ci) = ndimage.distance_transform_edt(grid, return_indices=True)
        crop = (slice(pad, pad + canvas.height), slice(pad, pad + canvas.width))
        distance = (dist_px[crop] * canvas.um).astype(np.float32)
        rows, cols = np.indices(canvas.shape)
        normal = np.arctan2(rows + pad - ri[crop], cols + pad - ci[crop]).astype(np.float32)
    wobble = 4.0 * canvas.noise(25.0)
    core = _band(distance, -1e9, core_r + wobble, canvas.um)
    lining = _band(distance, core_r + wobble, reach + wobble, canvas.um)
    eosin, hematoxylin, spindles = _stroma(canvas, 0.5, 1 / 500, rng.uniform(0, np.pi))
    keep = rng.random(len(spindles.x)) < canvas.at(core, spindles.x, spindles.y)
    spindles = spindles.subset(keep)
    lx, ly = canvas.uniform_points(1 / 30, margin_um=10)
    lx, ly = canvas.thin(np.clip(lining * 1.3, 0, 1), lx, ly)
    keep = _spread_out(lx, ly, 6.5)
    lx, ly = lx[keep], ly[keep]
    n = len(lx)
    cells = _Nuclei.make(
        rng,
        lx,
        ly,
        5.8 * style.nuclear_scale * rng.uniform(0.85, 1.2, n),
        rng.uniform(1.8, 2.6, n),
        angle=canvas.at(normal, lx, ly) + rng.normal(0, 0.2, n),
        dark=rng.uniform(1.35, 1.75, n),
        rim=0.3,
    )
    tissue = np.clip(core + lining, 0, 1)
    eosin = eosin * core + 0.36 * lining + 0.05 * (1 - tissue)
    hematoxylin = hematoxylin * core + 0.1 * lining
    return _Tissue(eosin, hematoxylin, (1 - tissue) * 0.92, cells + spindles)


def _frond_skeleton(canvas: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segments (x0, y0, x1, y1) of branching trees, the fronds' axes: random walks that fork.

    Grown one generation at a time for all trees at once: every tip draws a segment, then
    continues (slightly turning) and sometimes forks.
    """
    rng, scale = canvas.rng, canvas.style.structure_scale
    x, y = canvas.uniform_points(1 / (190.0 * scale) ** 2, margin_um=150.0 * scale)
    heading = rng.uniform(0, 2 * np.pi, len(x))
    depth = np.zeros(len(x), int)
    segments = []
    while len(x):
        length = rng.uniform(35, 80, len(x)) * scale
        x1, y1 = x + length * np.cos(heading), y + length * np.sin(heading)
        segments.append((x, y, x1, y1))
        grow = depth < 5
        fork = grow & (rng.random(len(x)) < 0.45)
        turn = rng.choice([-1.0, 1.0], len(x)) * rng.uniform(0.6, 1.1, len(x))
        x = np.r_[x1[grow], x1[fork]]
        y = np.r_[y1[grow], y1[fork]]
        heading = np.r_[heading[grow] + rng.normal(0, 0.35, int(grow.sum())), (heading + turn)[fork]]
        depth = np.r_[depth[grow] + 1, depth[fork] + 2]
    if not segments:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    x0, y0, x1, y1 = (np.concatenate(part) for part in zip(*segments, strict=True))
    return x0, y0, x1, y1


_LAYOUTS: dict[str, Callable[[_Canvas], _Tissue]] = {
    "adenosis": _adenosis,
    "fibroadenoma": _fibroadenoma,
    "phyllodes_tumor": _phyllodes_tumor,
    "tubular_adenoma": _tubular_adenoma,
    "ductal_carcinoma": _ductal_carcinoma,
    "lobular_carcinoma": _lobular_carcinoma,
    "mucinous_carcinoma": _mucinous_carcinoma,
    "papillary_carcinoma": _papillary_carcinoma,
}
assert set(_LAYOUTS) == set(SUBTYPES)


# ----------------------------------------------------------------------------------------
# Nuclei and colour
# ----------------------------------------------------------------------------------------


def _splat(canvas: _Canvas, x: np.ndarray, y: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Spread ``amount`` (µm^2 x density) of each point over its 4 nearest pixels: per-pixel density."""
    px, py = x / canvas.um - 0.5, y / canvas.um - 0.5
    c0, r0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - c0, py - r0
    total = np.zeros(canvas.height * canvas.width)
    value = amount / canvas.um**2
    for dr, dc, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (0, 1, fx * (1 - fy)),
        (1, 0, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        rows, cols = r0 + dr, c0 + dc
        ok = (rows >= 0) & (rows < canvas.height) & (cols >= 0) & (cols < canvas.width)
        total += np.bincount(
            rows[ok] * canvas.width + cols[ok], weights=(value * weight)[ok], minlength=total.size
        )
    return total.reshape(canvas.shape).astype(np.float32)


def _render_nuclei(canvas: _Canvas, nuclei: _Nuclei) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin density and coverage of the nuclei.

    Nuclei narrower than a pixel are splatted (their density spread over the nearest
    pixels, so small nuclei darken in proportion to their area); larger ones are drawn as
    ellipses: every pixel takes its nearest nucleus centre (an exact Euclidean distance
    transform with indices) and tests itself against that nucleus's ellipse.
    """
    um = canvas.um
    density, coverage = canvas.zeros(), canvas.zeros()
    if len(nuclei.x) == 0:
        return density, coverage
    area = np.pi * nuclei.a * nuclei.b
    small = nuclei.b / um < 0.75
    if small.any():
        density += _splat(canvas, nuclei.x[small], nuclei.y[small], area[small] * nuclei.dark[small] * 0.9)
        coverage += np.clip(_splat(canvas, nuclei.x[small], nuclei.y[small], area[small]), 0, 1)
    big = np.nonzero(~small)[0]
    if big.size == 0:
        return density, coverage
    pad = int(np.ceil(nuclei.a[big].max() / um)) + 2
    seeds = np.full((canvas.height + 2 * pad, canvas.width + 2 * pad), -1, np.int32)
    rows = np.floor(nuclei.y[big] / um).astype(int) + pad
    cols = np.floor(nuclei.x[big] / um).astype(int) + pad
    ok = (rows >= 0) & (rows < seeds.shape[0]) & (cols >= 0) & (cols < seeds.shape[1])
    seeds[rows[ok], cols[ok]] = big[ok]
    if not ok.any():
        return density, coverage
    ri, ci = ndimage.distance_transform_edt(seeds < 0, return_distances=False, return_indices=True)
    crop = (slice(pad, pad + canvas.height), slice(pad, pad + canvas.width))
    owner = seeds[ri[crop], ci[crop]]  # (H, W) index of each pixel's nearest nucleus centre

    def per_pixel(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[owner]

    dx = canvas.x - per_pixel(nuclei.x)
    dy = canvas.y - per_pixel(nuclei.y)
    cos, sin = per_pixel(np.cos(nuclei.angle)), per_pixel(np.sin(nuclei.angle))
    u = (dx * cos + dy * sin) * per_pixel(1 / nuclei.a)
    v = (sin * dx - cos * dy) * per_pixel(1 / nuclei.b)
    d2 = u * u + v * v
    cover = _soft_inside(np.sqrt(d2), per_pixel(nuclei.b / um), per_pixel(area / um**2))
    rim = per_pixel(nuclei.rim)
    chromatin = 1.0 + 0.3 * canvas.noise(0.7)
    profile = ((1 - rim) + rim * (0.45 + 1.1 * d2)) * chromatin
    nucleolus = per_pixel(nuclei.nucleolus) * np.exp(-d2 / np.float32(0.03))
    density += (per_pixel(nuclei.dark) * profile + nucleolus) * cover
    np.maximum(coverage, cover, out=coverage)
    return density, coverage


def _compose(canvas: _Canvas, tissue: _Tissue, stain: _Stain) -> np.ndarray:
    """Beer-Lambert colour from stain densities, then focus blur and sensor noise."""
    rng = canvas.rng
    nuclear, nuclear_cover = _render_nuclei(canvas, tissue.nuclei)
    filled = 1.0 - np.clip(tissue.empty, 0, 1)
    hematoxylin = (tissue.hematoxylin * filled + nuclear) * stain.h_amount * rng.uniform(0.93, 1.07)
    eosin = (
        tissue.eosin
        * filled
        * (1 - 0.55 * np.clip(nuclear_cover, 0, 1))
        * stain.e_amount
        * rng.uniform(0.93, 1.07)
    )
    blur = rng.uniform(0.35, 0.9)  # pixels: focus varies from image to image
    hematoxylin = ndimage.gaussian_filter(hematoxylin.astype(np.float32), blur)
    eosin = ndimage.gaussian_filter(eosin.astype(np.float32), blur)
    noise_level = np.float32(rng.uniform(1.0, 2.5) * np.sqrt(12.0))  # sensor noise, std 1-2.5 grey levels
    channels = []
    for c in range(3):  # optical density -> transmitted light, one channel at a time
        density = hematoxylin * np.float32(stain.hematoxylin[c]) + eosin * np.float32(stain.eosin[c])
        light = np.exp(-density) * np.float32(255.0 * stain.background[c])
        light += (rng.random(canvas.shape, dtype=np.float32) - np.float32(0.5)) * noise_level
        channels.append(light)
    rgb = np.stack(channels, axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
