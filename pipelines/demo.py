"""The main job (``fod demo``, the README's first command): on a fresh clone, start the
embedded stack, generate and version the demo data in DVC, run the training pipeline
with the KFP local runner (which deploys the champion to a local KServe model server),
and report the registered champion and what the server answers for a few test images.

Re-running it reuses everything that did not change: the stack, the data version, the
feature cache and (through KFP caching) the pipeline steps whose inputs are the same.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from components.data_version import DvcRepo, remote_url
from components.local.servers import LocalServing
from components.local.stack import EmbeddedStack
from components.tracking import registered_name
from pipelines.parameters import DEFAULT_CATEGORIES, checked, run_arguments

log = logging.getLogger(__name__)

DEMO_CATEGORY = DEFAULT_CATEGORIES[0]


@dataclass(frozen=True)
class DemoSettings:
    """Small enough for a 2-core CPU in minutes; the architecture is the compact preset."""

    image_size: int = 128
    n_train: int = 40
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3
    model_size: str = "compact"
    seed: int = 0

    def training_arguments(self) -> dict:
        """The pipeline parameters these settings fix (the main job and `--preset demo`)."""
        return checked(
            {
                "image_size": self.image_size,
                "model_size": self.model_size,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "learning_rate": self.learning_rate,
            }
        )


def run_demo(
    repo_root: str | Path = ".",
    *,
    demo: DemoSettings | None = None,
    stack: EmbeddedStack | None = None,
    verbose: bool = False,
) -> dict:
    from mlflow import MlflowClient

    from fod_core.synthetic import make_synthetic_dataset
    from pipelines.runner import run_local

    demo = demo or DemoSettings()
    repo_root = Path(repo_root).resolve()
    started = time.perf_counter()
    stack = stack or EmbeddedStack(repo_root / ".fod")
    settings = stack.up()
    settings.export()
    os.environ["FOD_HOME"] = str(stack.home)  # the deploy step keeps its server state there
    timings = {"stack_s": time.perf_counter() - started}

    data_dir = repo_root / "data"
    if not (data_dir / DEMO_CATEGORY).is_dir():
        # Deterministic: the same bytes on every machine, so data.dvc stays as committed.
        make_synthetic_dataset(
            data_dir, DEMO_CATEGORY, n_train=demo.n_train, size=demo.image_size, seed=demo.seed
        )
    repo = DvcRepo(repo_root)
    repo.ensure(settings)
    version = repo.add_and_push(data_dir)
    timings["data_s"] = time.perf_counter() - started - timings["stack_s"]

    arguments = run_arguments(
        data_version=version.md5,
        categories=[DEMO_CATEGORY],
        repo_root=repo_root,
        dvc_remote=remote_url(settings),
        overrides=demo.training_arguments() | {"deploy_target": "local"},
    )
    run_local(arguments, repo_root / "runs" / "pipeline", verbose=verbose)
    timings["pipeline_s"] = time.perf_counter() - started - sum(timings.values())

    from components.registry import CHAMPION

    client = MlflowClient(settings.mlflow_uri)
    name = registered_name(DEMO_CATEGORY)
    champion = client.get_model_version_by_alias(name, CHAMPION)
    latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    server = LocalServing(stack.home).get(name)
    samples = sorted((data_dir / DEMO_CATEGORY / "test").glob("*/000.png"))
    served = server.predict([p.read_bytes() for p in samples]) if server else []
    return {
        "mlflow_ui": settings.mlflow_uri,
        "registered_model": name,
        "champion_version": champion.version,
        "latest_version": str(latest),
        "champion_metrics": champion.tags.get("metrics"),
        "data_version": version.md5,
        "serving_url": server.url if server else None,
        "served": [
            {"image": str(path.relative_to(repo_root)), **result}
            for path, result in zip(samples, served, strict=True)
        ],
        "seconds": {k: round(v, 1) for k, v in timings.items()}
        | {"total_s": round(time.perf_counter() - started, 1)},
    }
