"""The benchmark-only side of issue 28: the ELPV products laid out from the PyPI package and
anomalib's peers run on our split (both need the ``peers`` extra and skip without it), and
the paired comparison of FOD's AUROC with a peer's (plain NumPy, always run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bench_preset import parse_product  # noqa: E402


def test_a_product_names_its_root_and_layout() -> None:
    assert parse_product("screw=../shared/data/screw_512") == (
        "screw",
        "../shared/data/screw_512",
        "mvtec",
    )
    assert parse_product("elpv_mono=runs/data/elpv:folder") == (
        "elpv_mono",
        "runs/data/elpv",
        "folder",
    )


@pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None,
    reason="the ELPV images come with the benchmark extra: pip install -e '.[peers]'",
)
def test_elpv_lays_out_as_two_folder_products(tmp_path) -> None:
    from elpv_products import lay_out

    from fod_core.data import load_category

    counts = lay_out(tmp_path)
    # the package's labels: mono 588 good, 313 defective, 173 uncertain; poly 920, 402, 228
    assert counts["elpv_mono/good"] == 588 and counts["elpv_mono/defects/defective"] == 313
    assert counts["uncertain/elpv_mono/p033"] + counts["uncertain/elpv_mono/p067"] == 173
    assert counts["elpv_poly/good"] == 920 and counts["elpv_poly/defects/defective"] == 402
    data = load_category(tmp_path, "elpv_mono", "folder")
    assert sum(r.label for r in data.test) == 313  # the uncertain ones are not test defects
    assert all(r.mask_path is None for r in data.test)  # image labels only
    assert lay_out(tmp_path) == counts  # links again, nothing doubled


@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is None,
    reason="anomalib's PatchCore comes with the benchmark extra: pip install -e '.[peers]'",
)
def test_a_peer_runs_on_our_split_with_our_backbone(synthetic_root, tmp_path) -> None:
    out = tmp_path / "patchcore.json"
    command = [sys.executable, str(BENCHMARKS / "bench_products.py"), "--peer-worker"]
    command += ["patchcore", "--data", str(synthetic_root), "--category", "widget"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["image_auroc"] > 0.9  # planted defects on generated parts
    assert result["pixel_auroc"] is not None and result["aupro"] is not None  # masks exist
    assert set(result["catch_rate_at_test_far"]) == {"1%", "5%"}
    assert result["fit_s"] > 0 and result["ms_per_image_batch1"] > 0


# a peer's result as the worker writes it: 4 of 10 defects caught at its own threshold
PEER_RESULT = {
    "image_auroc": 0.9,
    "f1_at_own_threshold": 0.5,
    "catch_rate_at_own_threshold": 0.4,
    "n_anomalous": 10,
    "false_alarms": 0,
    "n_normal": 20,
    "catch_rate_at_test_far": {"1%": 0.3, "5%": 0.6},
    "fit_s": 60.0,
    "ms_per_image_batch1": 50.0,
    "peak_rss_gb": 1.2,
}


def test_the_table_puts_fod_and_a_peer_side_by_side() -> None:
    from bench_products import markdown_table

    fod = {
        "test": {"image_auroc": 0.95},
        "at_shipped_threshold": {
            "defects_caught": 8,
            "n_anomalous": 10,
            "false_alarms": 2,
            "n_normal": 20,
            "promised_false_alarm_rate": 0.085,
        },
        "catch_rate_at_test_far": {"0.01": 0.5, "0.05": 0.7},
        "train_wall_s": 1200.0,
        "ms_per_image_batch1": 90.0,
        "train_peak_rss_gb": 3.3,
    }
    peer = PEER_RESULT
    table = markdown_table({"products": {"widget": {"fod": fod, "patchcore": peer}}})
    header, rule, fod_row, peer_row = table.splitlines()
    assert header.count("|") == rule.count("|") == fod_row.count("|") == peer_row.count("|")
    # F1 from the counts: 2 * 8 / (2 * 8 + 2 missed + 2 false alarms) = 0.8
    assert "| widget | FOD `--preset auto` | 0.950 | - | - | 0.800 | 8/10 | 2/20 | ≤8.5% |" in (
        fod_row
    )
    assert "50.0% / 70.0%" in fod_row and "| 1200.0 | 90.0 | 3.3 |" in fod_row
    assert "| PatchCore (1% coreset) | 0.900 | - | - | 0.500 | 4/10 | 0/20 | - |" in peer_row
    assert fod_row.endswith("| - |")  # no machine recorded: none is claimed


def test_each_result_keeps_the_machine_it_was_measured_on() -> None:
    from bench_products import cpu_label, keep_earlier, markdown_table

    epyc = {"name": "AMD EPYC", "isa": ["avx2", "fma", "avx512f"], "cpus": 2}
    xeon = {"name": "Intel(R) Xeon(R) Processor", "isa": ["avx2", "amx_bf16"], "cpus": 2}
    earlier = {
        "machine": xeon,  # the last call's machine, not the one bottle's peer ran on
        "products": {
            "bottle": {"padim": {"image_auroc": 0.99, "machine": epyc}},
            "screw": {"padim": {"image_auroc": 0.75}},  # from before results were stamped
        },
    }
    report = {"machine": {"name": "this one"}, "products": {}}
    keep_earlier(report, earlier)
    assert report["products"]["bottle"]["padim"]["machine"] == epyc
    assert report["products"]["screw"]["padim"]["machine"] == xeon
    assert cpu_label(epyc) == "AMD EPYC, AVX-512" and cpu_label(xeon) == "Intel Xeon, AMX"
    assert cpu_label({"name": "old", "isa": []}) == "old, no AVX2" and cpu_label(None) == "-"
    peer = PEER_RESULT
    table = markdown_table({"products": {"widget": {"padim": peer | {"machine": epyc}}}})
    assert table.splitlines()[-1].endswith("| 60.0 | 50.0 | 1.2 | AMD EPYC, AVX-512 |")


def test_the_bootstrap_auroc_is_sklearns_with_ties() -> None:
    import numpy as np
    from paired_auroc import auroc
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    normal = rng.normal(size=(3, 40)).round(1)  # rounded: many ties
    anomalous = (rng.normal(size=(3, 60)) + 1).round(1)
    expected = [
        roc_auc_score([0] * 40 + [1] * 60, np.r_[normal[i], anomalous[i]]) for i in range(3)
    ]
    assert np.allclose(auroc(normal, anomalous), expected)


def test_a_paired_difference_separates_a_real_gap_from_none() -> None:
    import numpy as np
    from paired_auroc import paired_difference

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(100), np.ones(300)]
    scores = np.r_[rng.normal(size=100), rng.normal(size=300) + 1.5]
    same = paired_difference(labels, scores, scores)
    assert same.difference == same.low == same.high == 0.0
    worse_peer = paired_difference(labels, scores, scores + rng.normal(size=400))
    assert worse_peer.difference > 0 and worse_peer.low > 0  # FOD ahead, and surely
    assert worse_peer.low < worse_peer.difference < worse_peer.high
    better_peer = paired_difference(labels, scores + rng.normal(size=400), scores)
    assert better_peer.high < 0 and better_peer.share_fod_not_behind < 0.05
    with pytest.raises(ValueError, match="normal and anomalous"):
        paired_difference(np.ones(4), np.arange(4.0), np.arange(4.0))


def test_a_peers_scores_are_matched_to_fods_by_identity() -> None:
    from paired_auroc import matched

    fod = {"data/screw/test/good/000.png": (0, 0.1), "data/screw/test/bad/000.png": (1, 0.9)}
    peer = {"test/bad/000.png": 0.7, "test/good/000.png": 0.2}
    labels, fod_scores, peer_scores = matched(fod, peer)
    assert labels.tolist() == [0, 1]
    assert fod_scores.tolist() == [0.1, 0.9] and peer_scores.tolist() == [0.2, 0.7]
    with pytest.raises(ValueError, match="FOD scored 2 test images, the peer 3"):
        matched(fod, {**peer, "test/bad/001.png": 0.5})
    with pytest.raises(ValueError, match="matches two of FOD's"):
        matched({**fod, "other/screw/test/good/000.png": (0, 0.3)}, peer)


def test_one_rare_class_member_is_kept_in_every_resample() -> None:
    """Normals and defects are drawn apart: with one normal, a pooled draw would often
    have none and no AUROC; drawn apart, every resample has it."""
    import numpy as np
    from paired_auroc import paired_difference

    labels = np.r_[0, np.ones(30)]
    fod = np.r_[0.0, np.linspace(1, 2, 30)]  # the normal below every defect
    peer = np.r_[1.5, np.linspace(1, 2, 30)]  # the normal in the middle
    d = paired_difference(labels, fod, peer, resamples=500)
    assert d.fod == 1.0 and abs(d.peer - 0.5) < 0.05
    assert d.low > 0 and d.share_fod_not_behind == 1.0


def test_compare_reads_fods_predictions_beside_the_peers_scores(tmp_path) -> None:
    from paired_auroc import compare

    evaluation = tmp_path / "model" / "evaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "predictions.csv").write_text(
        "path,defect_type,label,score,is_anomalous\n"
        "d/p/test/good/0.png,good,0,0.1,0\nd/p/test/good/1.png,good,0,0.2,0\n"
        "d/p/test/bad/0.png,bad,1,0.9,1\nd/p/test/bad/1.png,bad,1,0.15,0\n"
    )
    peer = {"test/good/0.png": 0.1, "test/good/1.png": 0.2, "test/bad/0.png": 0.9}
    results = {
        "products": {
            "p": {
                "fod": {"model_dir": str(tmp_path / "model")},
                "patchcore": {"test_scores": {**peer, "test/bad/1.png": 0.3}},
                "padim": {"image_auroc": 0.5},  # run before scores were kept: left out
            }
        }
    }
    [(name, peer_name, d)] = compare(results, resamples=200)
    assert (name, peer_name) == ("p", "patchcore")
    assert d.fod == 0.75 and d.peer == 1.0 and d.difference == -0.25
    # a product whose model folder is not on this machine is named and skipped
    results["products"]["gone"] = {
        "fod": {"model_dir": str(tmp_path / "elsewhere")},
        "patchcore": {"test_scores": peer},
    }
    assert [row[0] for row in compare(results, resamples=50)] == ["p"]
    assert compare(results, resamples=50, products=["gone"]) == []
