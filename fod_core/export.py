"""Export: the whole scoring path after image decoding and pre-processing (backbone, every
FOD level, the inter-divergence weighting, maps, smoothing, image score) as one graph for
ONNX Runtime or OpenVINO, checked against PyTorch before anything serves it.

<model>/export/model.onnx           ONNX, batch dimension dynamic, fp32
<model>/export/openvino/model.xml   OpenVINO IR (+ model.bin), fp32, from the ONNX graph
fod.json "export"                   per format: its file, what it was traced from, parity

Decoding, resizing, pose normalisation and the decision (threshold) stay in Python, in
the same ``PreProcessing`` / ``PostProcessing`` objects that PyTorch scoring uses, so a
new threshold needs no new export; level weights and smoothing are in the graph, and an
export traced with other ones (or other weights) is refused as stale.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fod_core.artifact import files_digest, scoring_fingerprint
from fod_core.config import Precision
from fod_core.inference import AnomalyDetector, Detector

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
# The parity gate: image scores to 1e-4 relative, maps to 1e-3 of the map's own scale
# (its largest absolute value over the batch), on validation images and planted anomalies.
SCORE_RTOL = 1e-4
MAP_TOL = 1e-3
PARITY_MAX_IMAGES = 24  # validation normals used (and as many planted copies)
_EXAMPLE_BATCH = 2  # traced with 2 images, so the batch dimension cannot be specialised


class Runtime(str, Enum):
    """What runs the scoring graph."""

    TORCH = "torch"
    ONNX = "onnx"  # ONNX Runtime, CPU
    OPENVINO = "openvino"  # OpenVINO, CPU, fp32 inference precision


EXPORT_FORMATS = (Runtime.ONNX, Runtime.OPENVINO)
_FILES = {Runtime.ONNX: "model.onnx", Runtime.OPENVINO: "openvino/model.xml"}


class ExportError(RuntimeError):
    """An export that cannot be made, is missing, stale, or failed its parity check."""


def export_file(model_dir: str | Path, runtime: Runtime | str) -> Path:
    return Path(model_dir) / EXPORT_DIR / _FILES[Runtime(runtime)]


# -- writing the graph --------------------------------------------------------------------
def _require(module: str, runtime: Runtime):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportError(
            f"{runtime.value} needs the '{module}' package: pip install 'fod-pipeline[export]'"
        ) from error


def export_onnx(detector: AnomalyDetector, path: Path) -> Path:
    """Trace ``detector``'s scoring graph with torch.export and write it as ONNX."""
    _require("onnx", Runtime.ONNX)
    _require("onnxscript", Runtime.ONNX)  # torch's ONNX exporter translates with it
    if detector.device.type != "cpu":
        raise ExportError("export from a detector on the CPU (load_detector(..., device='cpu'))")
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = detector.graph(chunked=False)
    size = detector.pre.image_size
    example = torch.zeros(_EXAMPLE_BATCH, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its stages and logs every pass at INFO: kept out of the output.
    quiet = logging.getLogger("onnx_ir")
    level, printed = quiet.level, io.StringIO()
    quiet.setLevel(logging.WARNING)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(printed):
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["anomaly_maps", "scores"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception:
        log.error("torch.onnx.export said:\n%s", printed.getvalue())
        raise
    finally:
        quiet.setLevel(level)
    log.debug("torch.onnx.export: %s", printed.getvalue())
    return path


def export_openvino(onnx_path: Path, path: Path) -> Path:
    """Convert the ONNX graph to OpenVINO IR, keeping fp32 weights (OpenVINO would halve
    them by default, which the parity gate would catch)."""
    ov = _require("openvino", Runtime.OPENVINO)
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
    return path


# -- running it ---------------------------------------------------------------------------
class ExportedGraph:
    """An exported scoring graph in ONNX Runtime or OpenVINO: (N, 3, S, S) float32 ->
    (maps (N, S, S), scores (N,))."""

    def __init__(self, path: str | Path, runtime: Runtime | str) -> None:
        self.path = Path(path)
        self.runtime = Runtime(runtime)
        if not self.path.is_file():
            raise ExportError(f"{self.path} does not exist: run `fod export` first")
        if self.runtime is Runtime.TORCH:
            raise ExportError("torch is not an exported runtime")
        module = "onnxruntime" if self.runtime is Runtime.ONNX else "openvino"
        library = _require(module, self.runtime)
        try:
            self._run = (
                self._onnx_runtime(library)
                if self.runtime is Runtime.ONNX
                else self._openvino(library)
            )
        except Exception as error:  # a damaged file: the runtime's own error, with its name
            raise ExportError(
                f"{self.runtime.value} cannot load {self.path} ({type(error).__name__}: "
                f"{error}); run `fod export` again"
            ) from error

    def _onnx_runtime(self, ort) -> Callable[[np.ndarray], list[np.ndarray]]:
        """As many threads as PyTorch has, which never spin after a run: spinning workers
        would take the cores from the next image's decoding (``fod_core.runtime``)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"images": x})

    def _openvino(self, ov) -> Callable[[np.ndarray], list[np.ndarray]]:
        # fp32 explicitly: on CPUs with bf16 OpenVINO would otherwise compute in bf16.
        compiled = ov.Core().compile_model(
            str(self.path),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            },
        )
        request = compiled.create_infer_request()  # one: scoring runs on one thread

        def run(x: np.ndarray) -> list[np.ndarray]:
            results = request.infer({0: x})
            return [np.array(results[compiled.output(i)]) for i in range(2)]

        return run

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self._run(np.ascontiguousarray(images, dtype=np.float32))
        return maps, scores


class ExportedDetector(Detector):
    """A model served from its exported graph, with the artefact's own pre- and
    post-processing; answers exactly what ``AnomalyDetector.predict`` answers."""

    def __init__(self, exported: ExportedGraph, *, pre, post, chunk: int = 1) -> None:
        super().__init__(pre=pre, post=post)
        self.exported = exported
        self.runtime = exported.runtime.value
        # Images per pass: the graph takes a batch whole, and 16 images' attention maps
        # cost more per image than one's (and 14 GB); PyTorch chunks the same way.
        self.chunk = max(1, chunk)

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = [], []
        for part in images.cpu().split(self.chunk):
            m, s = self.exported(part.numpy())
            maps.append(torch.from_numpy(m))
            scores.append(torch.from_numpy(s))
        return torch.cat(maps), torch.cat(scores)


def _export_files_digest(model_dir: Path, runtime: Runtime) -> str:
    """The export's own files (ONNX; OpenVINO's .xml and .bin), so that a record cannot
    vouch for files written after its check."""
    path = export_file(model_dir, runtime)
    return files_digest([path, path.with_suffix(".bin")] if runtime is Runtime.OPENVINO else [path])


def export_problem(
    model_dir: Path, manifest: dict, runtime: Runtime, *, name_dir: bool = True
) -> str | None:
    """Why the ``runtime`` export of a model may not be used, or None when it may."""
    record = manifest.get("export", {}).get(runtime.value)
    where = f" in {model_dir}" if name_dir else ""
    if record is None:
        return (
            f"{model_dir} has no {runtime.value} export: run "
            f"`fod export --model {model_dir} --format {runtime.value}`"
        )
    parity = record.get("parity") or {}
    if not parity.get("passed"):
        return (
            f"the {runtime.value} export{where} failed its parity check "
            f"({parity.get('failure', 'not checked')}): serve it with --runtime torch"
        )
    if record.get("traced_with") != scoring_fingerprint(
        model_dir, manifest["postprocessing"], manifest.get("model")
    ):
        return (
            f"the {runtime.value} export{where} was traced from other weights or "
            "post-processing (re-trained or re-calibrated since): run `fod export` again"
        )
    if record.get("files_digest") != _export_files_digest(model_dir, runtime):
        return (
            f"the {runtime.value} export files{where} are not the ones that were "
            "checked (changed or incomplete): run `fod export` again"
        )
    return None


def export_failures(model_dir: str | Path) -> list[str]:
    """One readable line per export of the model that may not be used: failed its parity
    check (or could not be made), stale, or its files changed since the check."""
    from fod_core.artifact import read_manifest

    manifest = read_manifest(model_dir)
    problems = [
        export_problem(Path(model_dir), manifest, Runtime(name), name_dir=False)
        for name in sorted(manifest.get("export", {}))
    ]
    return [problem for problem in problems if problem]


def load_exported(model_dir: str | Path, runtime: Runtime | str) -> ExportedDetector:
    """The exported graph of ``runtime`` with the manifest's pre/post-processing, refused
    when it may not be used (``export_problem``)."""
    from fod_core.artifact import read_manifest
    from fod_core.processing import PostProcessing, PreProcessing

    model_dir = Path(model_dir)
    runtime = Runtime(runtime)
    manifest = read_manifest(model_dir)
    problem = export_problem(model_dir, manifest, runtime)
    if problem:
        raise ExportError(problem)
    record = manifest["export"][runtime.value]
    return ExportedDetector(
        ExportedGraph(model_dir / record["file"], runtime),
        pre=PreProcessing.from_dict(manifest["preprocessing"]),
        post=PostProcessing.from_dict(manifest["postprocessing"]),
        chunk=record.get("chunk", 1),
    )


# -- the parity gate ----------------------------------------------------------------------
@dataclass
class ParityReport:
    """How far an exported graph's answers are from PyTorch's on the same inputs."""

    runtime: str
    passed: bool
    n_images: int
    images: str  # what they were
    max_score_rel_error: float | None  # None: nothing was compared (the export failed)
    max_map_error: float | None  # relative to the map's scale (its largest absolute value)
    score_rtol: float = SCORE_RTOL
    map_tol: float = MAP_TOL
    seconds: float = 0.0
    failure: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_parity(
    detector: AnomalyDetector,
    exported: ExportedDetector,
    images: Sequence[Image.Image],
    *,
    describe: str,
    batch_size: int = 1,
) -> ParityReport:
    """Score the same pre-processed images with PyTorch and the exported graph. One image
    at a time by default: an exported graph takes a batch in one pass, and eight images'
    attention maps took the bottle export to 8.2 GB peak RSS against 1.9 GB."""
    started = time.perf_counter()
    if not images:
        raise ExportError("the parity check needs at least one image")
    score_error = map_error = 0.0

    def compare(maps, scores, other_maps, other_scores) -> tuple[float, float]:
        if other_maps.shape != maps.shape or other_scores.shape != scores.shape:
            return math.inf, math.inf  # e.g. a batch dimension the graph got wrong
        scale = max(float(maps.abs().max()), 1e-12)
        relative = (other_scores - scores).abs() / scores.abs().clamp_min(1e-12)
        errors = float(relative.max()), float((other_maps - maps).abs().max()) / scale
        return tuple(e if math.isfinite(e) else math.inf for e in errors)  # NaN fails

    for start in range(0, len(images), batch_size):
        batch, _ = detector.preprocess(list(images[start : start + batch_size]))
        errors = compare(*detector.score_batch(batch), *exported.score_batch(batch))
        score_error, map_error = max(score_error, errors[0]), max(map_error, errors[1])
    # Once with several images in one pass of the graph: served batches must not mix them.
    batch, _ = detector.preprocess(list(images[:2]))
    maps, scores = exported.exported(batch.numpy())
    errors = compare(*detector.score_batch(batch), torch.from_numpy(maps), torch.from_numpy(scores))
    score_error, map_error = max(score_error, errors[0]), max(map_error, errors[1])
    failures = []
    if score_error > SCORE_RTOL:
        failures.append(f"image scores differ by {score_error:.2e} relative (limit {SCORE_RTOL})")
    if map_error > MAP_TOL:
        failures.append(f"maps differ by {map_error:.2e} of their scale (limit {MAP_TOL})")
    return ParityReport(
        runtime=exported.runtime,
        passed=not failures,
        n_images=len(images),
        images=describe,
        max_score_rel_error=score_error,
        max_map_error=map_error,
        seconds=time.perf_counter() - started,
        failure="; ".join(failures) or None,
    )


@dataclass
class CheckSet:
    """The images a check scores: validation normals and an anomaly planted into each,
    with the planted masks (at the photos' size) for the accuracy check."""

    normals: list[Image.Image]
    planted: list[Image.Image]
    masks: list[np.ndarray]
    describe: str

    @property
    def images(self) -> list[Image.Image]:
        return self.normals + self.planted


def check_set(
    model_dir: str | Path,
    data_root: str | Path | None = None,
    category: str | None = None,
    *,
    format: str = "mvtec",
    max_images: int = PARITY_MAX_IMAGES,
    per_image: int = 1,
) -> CheckSet:
    """The model's validation normals (never a training image) and ``per_image``
    anomalies planted into each. Without data, the dataset the manifest names."""
    from fod_core.artifact import read_manifest
    from fod_core.calibration import model_split
    from fod_core.data import DatasetError, load_category
    from fod_core.synthetic import PLANTED_SEED, planted_copies

    manifest = read_manifest(model_dir)
    recorded = manifest.get("data", {})
    root = data_root or recorded.get("root")
    category = category or manifest.get("category")
    if root is None or category is None or not Path(root).exists():
        raise ExportError(
            "the check needs the model's validation images: pass --data and --category "
            f"({root!r} is not here)"
        )
    # the layout the model was trained on, unless the caller names the data
    data = load_category(root, category, format if data_root else recorded.get("format", format))
    split = model_split(manifest, data)
    train, val = split.train, split.validation
    chosen = sorted(val or train, key=lambda r: r.path.name)[:max_images]
    if not chosen:
        raise DatasetError(f"{root}/{category} has no normal images for the check")
    normals, draws = planted_copies(
        [r.path for r in chosen], per_image=per_image, seed=PLANTED_SEED
    )
    planted, masks = (list(x) for x in zip(*draws, strict=True))
    what = "validation" if val else "training (no validation split)"
    describe = f"{len(normals)} {what} normals + {len(planted)} planted anomalies"
    return CheckSet(normals, planted, masks, describe)


def parity_images(
    model_dir: str | Path,
    data_root: str | Path | None = None,
    category: str | None = None,
    *,
    format: str = "mvtec",
    max_images: int = PARITY_MAX_IMAGES,
) -> tuple[list[Image.Image], str]:
    """``check_set``'s images and what they are, for the parity gate."""
    images = check_set(model_dir, data_root, category, format=format, max_images=max_images)
    return images.images, images.describe


def _failed(runtime: Runtime, stage: str, error: Exception) -> ParityReport:
    """An export that could not be made or run is recorded like a failed check."""
    log.error("%s export: %s failed: %s", runtime.value, stage, error)
    return ParityReport(
        runtime=runtime.value,
        passed=False,
        n_images=0,
        images="",
        max_score_rel_error=None,
        max_map_error=None,
        failure=f"{stage} failed: {type(error).__name__}: {error}",
    )


def scoring_chunk(detector: AnomalyDetector) -> int:
    """Images per pass of an exported graph on the CPU: PyTorch's own rule."""
    return min(level.scoring_chunk(torch.device("cpu")) for level in detector.model.levels)


def _check(
    detector: AnomalyDetector, model_dir: Path, runtime: Runtime, images, describe: str
) -> ParityReport:
    try:
        graph = ExportedGraph(export_file(model_dir, runtime), runtime)
        exported = ExportedDetector(
            graph, pre=detector.pre, post=detector.post, chunk=scoring_chunk(detector)
        )
        report = check_parity(detector, exported, images, describe=describe)
    except Exception as error:  # an unreadable graph, a runtime that refuses it
        return _failed(runtime, "running the export", error)
    log.info(
        "%s export: parity %s (scores %.1e relative, maps %.1e of their scale), %d images",
        runtime.value,
        "passed" if report.passed else f"FAILED: {report.failure}",
        report.max_score_rel_error,
        report.max_map_error,
        report.n_images,
    )
    return report


def _save_records(model_dir: Path, records: dict) -> None:
    from fod_core.artifact import update_manifest

    update_manifest(model_dir, export=records)
    (model_dir / EXPORT_DIR).mkdir(exist_ok=True)
    (model_dir / EXPORT_DIR / "parity.json").write_text(
        json.dumps({k: v["parity"] for k, v in records.items()}, indent=2)
    )


def export_model(
    model_dir: str | Path,
    formats: Sequence[Runtime | str] = EXPORT_FORMATS,
    *,
    images: Sequence[Image.Image] | None = None,
    describe: str | None = None,
    data_root: str | Path | None = None,
    category: str | None = None,
    format: str = "mvtec",
) -> dict[str, dict]:
    """Lifecycle stage 'export': write each format into the model directory, check its
    parity with PyTorch, and record both in the manifest. A failed check (or an export
    that cannot be made) is recorded, not raised: the caller decides (``fod export`` exits
    non-zero, the pipeline tags the registered version and does not promote it)."""
    from fod_core.artifact import load_detector, read_manifest

    model_dir = Path(model_dir)
    wanted = sorted({Runtime(f) for f in formats}, key=lambda r: r is Runtime.OPENVINO)
    if Runtime.TORCH in wanted:
        raise ExportError("torch is not an export format (choose onnx or openvino)")
    if images is None:
        images, describe = parity_images(model_dir, data_root, category, format=format)
    detector = load_detector(model_dir)
    manifest = read_manifest(model_dir)
    traced_with = scoring_fingerprint(model_dir, manifest["postprocessing"], manifest.get("model"))
    records = dict(manifest.get("export", {}))
    # OpenVINO converts this run's ONNX graph, never an older one; asked for alone, from an
    # intermediate file, so that an earlier ONNX export and its record stay as they are.
    onnx_path = export_file(model_dir, Runtime.ONNX)
    if Runtime.ONNX not in wanted:
        onnx_path = export_file(model_dir, Runtime.OPENVINO).with_name("intermediate.onnx")
    onnx_fresh = False
    for runtime in wanted:
        started = time.perf_counter()
        record = {
            "file": str(export_file(model_dir, runtime).relative_to(model_dir)),
            "traced_with": traced_with,
            "torch_version": torch.__version__,
            "chunk": scoring_chunk(detector),
        }
        try:
            if not onnx_fresh:
                export_onnx(detector, onnx_path)
                onnx_fresh = True
            if runtime is Runtime.OPENVINO:
                export_openvino(onnx_path, export_file(model_dir, runtime))
            record["export_s"] = round(time.perf_counter() - started, 2)
            report = _check(detector, model_dir, runtime, images, describe or "given images")
        except Exception as error:  # the model itself is fine: record it, go on
            report = _failed(runtime, "export", error)
        record["files_digest"] = _export_files_digest(model_dir, runtime)
        records[runtime.value] = {**record, "parity": report.to_dict()}
    if Runtime.ONNX not in wanted:
        onnx_path.unlink(missing_ok=True)
    _save_records(model_dir, records)
    return records


def check_exports(
    model_dir: str | Path,
    *,
    images: Sequence[Image.Image] | None = None,
    describe: str | None = None,
    data_root: str | Path | None = None,
    category: str | None = None,
    format: str = "mvtec",
) -> dict[str, dict]:
    """Run the parity check again on the exports a model directory holds (after copying
    it, or upgrading a runtime) and record the result."""
    from fod_core.artifact import load_detector, read_manifest

    model_dir = Path(model_dir)
    records = dict(read_manifest(model_dir).get("export", {}))
    if not records:
        raise ExportError(f"{model_dir} holds no export to check: run `fod export` first")
    if images is None:
        images, describe = parity_images(model_dir, data_root, category, format=format)
    detector = load_detector(model_dir)
    for name, record in records.items():
        report = _check(detector, model_dir, Runtime(name), images, describe or "given images")
        digest = _export_files_digest(model_dir, Runtime(name))
        records[name] = {**record, "files_digest": digest, "parity": report.to_dict()}
    _save_records(model_dir, records)
    return records


def load_runtime(
    model_dir: str | Path,
    runtime: Runtime | str = Runtime.TORCH,
    *,
    device: str = "cpu",
    precision: Precision | str = Precision.FP32,
) -> Detector:
    """The model of ``model_dir`` run by ``runtime``: PyTorch (on ``device``, in
    ``precision``), or its checked export (on the CPU, fp32)."""
    from fod_core.artifact import load_detector

    if Runtime(runtime) is Runtime.TORCH:
        return load_detector(model_dir, device=device, precision=precision)
    if Precision(precision) is Precision.BF16:
        raise ExportError(
            f"--precision bf16 is for --runtime torch; the {Runtime(runtime).value} export "
            "scores in fp32"
        )
    if str(device) != "cpu":
        log.warning("%s runs on the CPU; --device %s is for torch", Runtime(runtime).value, device)
    return load_exported(model_dir, runtime)
