"""Shared fixtures: generated datasets (no download) and the optional real MVTec data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run offline and eagerly: compiling kernels for tiny shapes costs more than it saves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FOD_COMPILE", "0")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Under pytest-xdist (`make test` runs two workers), each worker and the processes it starts
# (KFP steps, servers) share the cores instead of each taking all of them.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

from fod_core.runtime import configure_cpu_numerics

configure_cpu_numerics()  # before any test starts PyTorch's worker threads

SHARED_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small MVTec-layout dataset with planted defects: category 'widget'."""
    from fod_core.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        "widget",
        n_train=24,
        n_test_good=6,
        n_test_defect=4,
        size=96,
        seed=1,
    )


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """The real MVTec AD data beside the checkout (CI always has it; a user's clone may not)."""
    if not (SHARED_MVTEC / "bottle").is_dir():
        pytest.skip(f"real MVTec AD data not found at {SHARED_MVTEC} (only in the project's CI)")
    return SHARED_MVTEC


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """A real embedded stack (SeaweedFS S3 + MLflow server) on loopback with free ports;
    components, KFP's subprocesses and local model servers find it through the environment."""
    from components.local.stack import EmbeddedStack

    stack = EmbeddedStack(tmp_path_factory.mktemp("fod-home"), s3_port=0, mlflow_port=0)
    settings = stack.up()
    env = settings.env() | {"FOD_HOME": str(stack.home)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield stack
    stack.down()  # model servers too
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def settings(stack):
    return stack.settings()


@pytest.fixture
def tracked_repo(settings, tmp_path):
    """A data folder of its own, tracked by DVC (``data.dvc``) and pushed to the stack's
    remote, so that a test needs no other test to have tracked the module's repo first."""
    from components.data_version import DvcRepo
    from fod_core.synthetic import make_synthetic_dataset

    root = tmp_path / "tracked-repo"
    make_synthetic_dataset(
        root / "data", "remote", n_train=2, n_test_good=1, n_test_defect=1, size=64, seed=3
    )
    repo = DvcRepo(root)
    repo.ensure(settings)
    repo.add_and_push(root / "data")
    return root


@pytest.fixture(scope="session")
def damage_onnx():
    """A function that scales the largest weight of an exported ONNX graph by 1.5: an
    export that no longer answers what the model answers, for the parity gate to catch."""

    def damage(path: Path) -> None:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path))
        largest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        scaled = numpy_helper.to_array(largest) * 1.5
        largest.CopyFrom(numpy_helper.from_array(scaled, largest.name))
        onnx.save(graph, str(path))

    return damage
