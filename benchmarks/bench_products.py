"""Every product, one command: FOD's `--preset auto` beside anomalib's PatchCore and PaDiM
on the same split, backbone, weights and input (issue 28; issue 31's catch rates).

    python benchmarks/elpv_products.py --out runs/data/elpv      # the solar cells
    python benchmarks/bench_products.py \
        --product bottle=../shared/data/mvtec_ad --product screw=../shared/data/screw_512 \
        --product elpv_mono=runs/data/elpv:folder --product elpv_poly=runs/data/elpv:folder \
        --peers-python .venv-peers/bin/python --out benchmarks/results/products.json

Per product, one process at a time (anomalib's threads spin and slow anything beside them):
FOD is trained and evaluated as a user runs it (`fod train --preset auto`, `fod evaluate`,
see ``bench_preset.py``); each peer runs in a process of its own (``--peer-worker``), in
the Python that has the ``peers`` extra. The peers see exactly FOD's training images (the
split of ``fod data splits``: the validation part held out), FOD's pre-processing (256 px,
the backbone's normalisation), efficientnet_lite0 stages 2-3 with the offline weights;
their threshold is set as FOD's is, on the same calibration normals by the same rule
(``calibrate_threshold``). Reported side by side: image AUROC (pixel AUROC and AUPRO where
masks exist), F1 and catch rate at each one's own threshold, the catch rate at test
false-alarm rates 1% and 5% (for the record), fit time, ms per image at batch 1, peak RSS
of the process; the machine's CPU and ISA. ``uncertain/<product>/`` beside a root (ELPV's
cells of probability 1/3 and 2/3) is scored separately: the share each model flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_preset import new_report, parse_product, run, train_and_evaluate

PEERS = ("patchcore", "padim")
LAYERS = [2, 3]  # efficientnet_lite0's stages, as FOD's --out-indices 2,3
PADIM_FEATURES = 100  # of the 152 channels, PaDiM's random selection (its resnet18 default)
CORESET = 0.01  # PatchCore's coreset ratio (the run)
RATES = (0.01, 0.05)


def uncertain_folders(root: str, name: str) -> dict[str, list[Path]]:
    base = Path(root) / "uncertain" / name
    if not base.is_dir():
        return {}
    return {d.name: sorted(d.glob("*.png")) for d in sorted(base.iterdir()) if d.is_dir()}


# --- the peer worker (runs in the Python with the `peers` extra) -------------------------


def build_peer(peer: str, extractor):
    """anomalib's torch model with our backbone and its offline weights (no hub)."""
    if peer == "patchcore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(layers=LAYERS, backbone=extractor.spec.name, pre_trained=False)
    else:
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(
            backbone=extractor.spec.name,
            layers=LAYERS,
            pre_trained=False,
            n_features=PADIM_FEATURES,
        )
    model.feature_extractor.feature_extractor.load_state_dict(extractor.body.state_dict())
    return model


def peer_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from fod_core.backbone import BackboneSpec, FeatureExtractor
    from fod_core.calibration import calibrate_threshold
    from fod_core.data import load_category, split_roles, split_validation
    from fod_core.metrics import (
        aupro,
        catch_rate_at_false_alarm_rate,
        confusion_at,
        image_auroc,
        pixel_auroc,
    )
    from fod_core.processing import PreProcessing, read_image, read_mask

    # Not our configure_cpu_numerics(): its allocator setting (freed buffers kept, never
    # returned) suits FOD's fixed-size steps, but under PatchCore's greedy coreset the heap
    # fragments to 24 GB by step 170 on bottle. The peers run with the allocator's defaults.
    torch.manual_seed(0)
    # PatchCore's coreset projects with sklearn's sample_without_replacement, which draws
    # from NumPy's global generator: unseeded, two runs on one split differed by up to
    # 0.06 image AUROC (screw, sessions 16 and 17, BENCHMARKS.md)
    np.random.seed(0)
    data = load_category(args.data, args.category, args.format)
    train, validation = split_validation(data.train, args.val_fraction)  # FOD's split
    _, calibration = split_roles(validation, args.choice_fraction)
    extractor = FeatureExtractor(spec=BackboneSpec()).eval()
    pre = PreProcessing(256, extractor.mean, extractor.std)
    model = build_peer(args.peer_worker, extractor)

    def batches(paths, size=8):
        for start in range(0, len(paths), size):
            yield torch.stack([pre(read_image(p)) for p in paths[start : start + size]])

    started = time.perf_counter()
    model.train()
    # no autograd: anomalib's Lightning module fits without gradients too
    with torch.no_grad():
        for batch in batches([r.path for r in train]):
            model(batch)
        if args.peer_worker == "patchcore":
            model.subsample_embedding(CORESET)
        else:
            model.fit()
    fit_s = time.perf_counter() - started
    model.eval()

    @torch.no_grad()
    def score(paths):
        scores, maps = [], []
        for batch in batches(paths):
            out = model(batch)
            scores.append(out.pred_score.flatten().float())
            maps.append(out.anomaly_map.reshape(len(batch), 256, 256).float())
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    test_paths = [r.path for r in data.test]
    labels = np.array([r.label for r in data.test])
    test_scores, test_maps = score(test_paths)
    calibration_scores, _ = score([r.path for r in calibration])
    threshold = calibrate_threshold(calibration_scores)
    with torch.no_grad():  # batch 1, as a line scores one part at a time
        probe = [pre(read_image(p))[None] for p in test_paths[:16]]
        model(probe[0])
        started = time.perf_counter()
        for image in probe:
            model(image)
        ms = (time.perf_counter() - started) / len(probe) * 1000
    counts = confusion_at(labels, test_scores, threshold.value)
    precision = counts["tp"] / max(counts["tp"] + counts["fp"], 1)
    recall = counts["tp"] / max(counts["tp"] + counts["fn"], 1)
    result = {
        "image_auroc": image_auroc(labels, test_scores),
        "f1_at_own_threshold": 2 * precision * recall / max(precision + recall, 1e-12),
        "catch_rate_at_own_threshold": recall,
        "false_alarms": counts["fp"],
        "n_normal": int((labels == 0).sum()),
        "n_anomalous": int(labels.sum()),
        "promise": threshold.describe(),
        "promised_false_alarm_rate": threshold.guaranteed_false_alarm_rate,
        "catch_rate_at_test_far": {
            f"{rate:.0%}": catch_rate_at_false_alarm_rate(labels, test_scores, rate)
            for rate in RATES
        },
        "fit_s": round(fit_s, 1),
        "ms_per_image_batch1": round(ms, 1),
        "train_images": len(train),
        # per test image, for a paired comparison with FOD's (benchmarks/paired_auroc.py)
        "test_scores": {r.identity: float(s) for r, s in zip(data.test, test_scores, strict=True)},
    }
    if any(r.mask_path for r in data.test):
        masks = np.stack(
            [
                read_mask(r.mask_path, 256) if r.mask_path else np.zeros((256, 256), bool)
                for r in data.test
            ]
        )
        result["pixel_auroc"] = pixel_auroc(masks, test_maps)
        result["aupro"] = aupro(masks, test_maps)
    uncertain = uncertain_folders(args.data, args.category)
    result["uncertain_flagged"] = {
        group: float(np.mean(score(paths)[0] >= threshold.value))
        for group, paths in uncertain.items()
    }
    args.out.write_text(json.dumps(result, indent=2))


# --- the whole table -----------------------------------------------------------------------


def fod_uncertain(model_dir: str, root: str, name: str) -> dict[str, float]:
    from fod_core.artifact import load_detector

    uncertain = uncertain_folders(root, name)
    if not uncertain:
        return {}
    detector = load_detector(model_dir)
    return {
        group: float(sum(p.is_anomalous for p in detector.predict(paths)) / len(paths))
        for group, paths in uncertain.items()
    }


def fod_split(fod: dict | None) -> tuple[float, float]:
    """FOD's validation and choice fractions (its artefact's), for the peers' split."""
    if not fod:
        return 0.1, 0.3  # TrainConfig's defaults
    config = json.loads((Path(fod["model_dir"]) / "fod.json").read_text())["training"]["config"]
    return config["val_fraction"], config["choice_fraction"]


def fod_ms_per_image(model_dir: str, root: str, name: str, fmt: str) -> float:
    """Milliseconds per image at batch 1 (a line scores one part at a time), as the peers'
    are timed: 16 test images after one warm-up, decoding included for both."""
    from fod_core.artifact import load_detector
    from fod_core.data import load_category

    detector = load_detector(model_dir)
    paths = [r.path for r in load_category(root, name, fmt).test[:16]]
    detector.predict(paths[:1])
    started = time.perf_counter()
    for path in paths:
        detector.predict([path])
    return round((time.perf_counter() - started) / len(paths) * 1000, 1)


def _f1(caught: int, n_anomalous: int, false_alarms: int) -> float:
    return 2 * caught / max(2 * caught + (n_anomalous - caught) + false_alarms, 1)


def markdown_table(report: dict) -> str:
    """One row per product and model: what the issue asks to see side by side."""
    head = (
        "| product | model | image AUROC | pixel AUROC | AUPRO | F1 at own threshold | "
        "caught at shipped threshold | false alarms | promise | caught at test FAR 1% / 5% "
        "| train (s) | ms/image (batch 1) | peak RSS (GB) | CPU |"
    )
    rows = [head, "|" + "---|" * 14]
    for name, entry in report["products"].items():
        for model in ("fod", *PEERS):
            if model not in entry:
                continue
            r = entry[model]
            if model == "fod":
                test, at = r["test"], r["at_shipped_threshold"]
                far = r.get("catch_rate_at_test_far") or {}
                caught, n_anom, fa, n_norm = (
                    at["defects_caught"],
                    at["n_anomalous"],
                    at["false_alarms"],
                    at["n_normal"],
                )
                cells = [
                    test["image_auroc"],
                    test.get("pixel_auroc"),
                    test.get("aupro"),
                    _f1(caught, n_anom, fa),
                    f"{caught}/{n_anom}",
                    f"{fa}/{n_norm}",
                    f"≤{at['promised_false_alarm_rate']:.1%}",
                    f"{far.get('0.01', 0):.1%} / {far.get('0.05', 0):.1%}",
                    r["train_wall_s"],
                    r.get("ms_per_image_batch1"),
                    r["train_peak_rss_gb"],
                ]
                label = "FOD `--preset auto`"
            else:
                far = r["catch_rate_at_test_far"]
                caught = round(r["catch_rate_at_own_threshold"] * r["n_anomalous"])
                cells = [
                    r["image_auroc"],
                    r.get("pixel_auroc"),
                    r.get("aupro"),
                    r["f1_at_own_threshold"],
                    f"{caught}/{r['n_anomalous']}",
                    f"{r['false_alarms']}/{r['n_normal']}",
                    (
                        f"≤{r['promised_false_alarm_rate']:.1%}"
                        if r.get("promised_false_alarm_rate") is not None
                        else "-"
                    ),
                    f"{far['1%']:.1%} / {far['5%']:.1%}",
                    r["fit_s"],  # features + fit; FOD's is the whole `fod train`
                    r["ms_per_image_batch1"],
                    r["peak_rss_gb"],
                ]
                label = {"patchcore": "PatchCore (1% coreset)", "padim": "PaDiM"}[model]
            shown = [
                f"{c:.3f}" if isinstance(c, float) and c <= 1 else ("-" if c is None else str(c))
                for c in cells
            ]
            shown.append(cpu_label(r.get("machine")))
            rows.append(f"| {name} | {label} | " + " | ".join(shown) + " |")
    return "\n".join(rows + uncertain_rows(report))


def cpu_label(machine: dict | None) -> str:
    """A result's CPU in a table cell: its name and the widest matrix ISA it has. Results
    measured in different sessions sit in one file; timings compare within a CPU only."""
    if not machine:
        return "-"
    isa = set(machine.get("isa", ()))
    widest = next(
        (
            label
            for flag, label in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
            if flag in isa
        ),
        "no AVX2",
    )
    name = " ".join(machine.get("name", "?").replace("(R)", "").replace("(TM)", "").split())
    return f"{name.removesuffix(' Processor')}, {widest}"


def keep_earlier(report: dict, earlier: dict) -> None:
    """Products measured by an earlier call stay in ``report``, each result stamped with
    the machine it was measured on (the earlier file's, where it had none of its own)."""
    report["products"] = earlier.get("products", {})
    for entry in report["products"].values():
        for result in entry.values():
            result.setdefault("machine", earlier.get("machine"))


def uncertain_rows(report: dict) -> list[str]:
    """The cells labelled neither good nor defective (ELPV's 1/3 and 2/3): the share each
    model flags at its own threshold, apart from the table's metrics."""
    rows = []
    for name, entry in report["products"].items():
        for model in ("fod", *PEERS):
            flagged = entry.get(model, {}).get("uncertain_flagged")
            if flagged:
                shares = ", ".join(f"{group}: {share:.1%}" for group, share in flagged.items())
                rows.append(f"| {name} | {model} | {shares} |")
    if not rows:
        return []
    head = "| product | model | uncertain cells flagged at its own threshold |"
    return ["", head, "|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--product", action="append", help="name=root[:format] (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--work", type=Path, default=Path("runs/products"))
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument(
        "--peers-python", default=sys.executable, help="a Python with the `peers` extra"
    )
    parser.add_argument("--skip-fod", action="store_true", help="the peers alone")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="a product's FOD results kept from an earlier call (its model folder) are read, "
        "not trained again",
    )
    # the worker's own arguments
    parser.add_argument("--peer-worker", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--category", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="mvtec", help=argparse.SUPPRESS)
    parser.add_argument("--val-fraction", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--choice-fraction", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", action="store_true", help="print --out's results as a Markdown table only"
    )
    args = parser.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return

    report = new_report("bench_products.py")
    if args.out.is_file():  # products measured earlier stay (one product per call is fine)
        keep_earlier(report, json.loads(args.out.read_text()))
    for product in args.product or []:
        name, root, fmt = parse_product(product)
        entry = report["products"].setdefault(name, {})
        if not args.skip_fod:
            fod = train_and_evaluate(
                name,
                root,
                fmt,
                preset=args.preset,
                work=args.work,
                cache_dir=args.cache_dir,
                reuse=args.reuse,
            )
            fod["uncertain_flagged"] = fod_uncertain(fod["model_dir"], root, name)
            fod["ms_per_image_batch1"] = fod_ms_per_image(fod["model_dir"], root, name, fmt)
            entry["fod"] = fod | {"machine": report["machine"]}
        split = fod_split(entry.get("fod"))
        for peer in args.peers:
            out = args.work / "peers" / name / f"{peer}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            command = [args.peers_python, __file__, "--peer-worker", peer, "--data", root]
            command += ["--category", name, "--format", fmt, "--out", str(out)]
            command += ["--val-fraction", str(split[0]), "--choice-fraction", str(split[1])]
            print(f"{name}: {peer}", flush=True)
            wall_s, peak_gb = run(command, out.with_suffix(".log"))
            entry[peer] = json.loads(out.read_text()) | {
                "wall_s": round(wall_s, 1),
                "peak_rss_gb": round(peak_gb, 2),
                "machine": report["machine"],
            }
            if "fod" in entry and entry[peer]["train_images"] != entry["fod"]["train_images"]:
                raise RuntimeError(f"{name}: {peer} trained on another split than FOD")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        shown = {k: v.get("test", v.get("image_auroc")) for k, v in entry.items()}
        print(json.dumps({name: shown}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
