"""The retrain check as a Kubeflow Pipelines recurring run (the KFP-native alternative to
the CronJob in infra/retrain).

The recurring run executes a one-step pipeline, ``fod-retrain-check``: it clones the
repository (``data.dvc`` holds the data version), and runs the same check as
``fod retrain``: categories whose current data no registered model was trained on get a
training-pipeline run, submitted to the same KFP endpoint and awaited. The recurring
run's spec (schedule, parameters) is kept in ``infra/kfp/recurring-run.yaml``;
``fod schedule create`` creates it through the kfp client.
"""

from pathlib import Path

import yaml
from kfp import compiler, dsl

from components.settings import DEFAULT_IMAGE
from pipelines.dag import set_cluster_settings, with_cluster_settings

SPEC = Path(__file__).resolve().parents[1] / "infra" / "kfp" / "recurring-run.yaml"
COMPILED_YAML = Path(__file__).with_name("fod_retrain_check.yaml")


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def retrain_check(
    git_url: str,
    git_ref: str,
    categories: list,
    kfp_host: str,
    deploy_target: str,
    warm_start: bool,
    on_drift: bool = False,
    drift_window: str = "24h",
) -> str:
    """Clone, compare the data version with the registry, submit training where it is new.
    ``on_drift``: only for categories whose served decisions drifted (``fod monitor``).

    It runs ``fod retrain`` in a process of its own: KFP runs this body with ``kfp.dsl`` in
    its runtime mode (``_KFP_RUNTIME``), where a pipeline cannot be compiled for submission."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path  # only the body reaches the container: every import is here

    env = {key: value for key, value in os.environ.items() if key != "_KFP_RUNTIME"}
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            ["git", "clone", "--depth=1", "--branch", git_ref, git_url, work], check=True
        )
        env["FOD_HOME"] = str(Path(work) / ".fod")
        argv = [
            sys.executable, "-m", "pipelines.cli", "retrain", "--categories", *categories,
            "--kfp-host", kfp_host, "--deploy", deploy_target,
            *(["--warm-start"] if warm_start else []),
            *(["--on-drift", "--drift-window", drift_window] if on_drift else []),
        ]  # fmt: skip
        result = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    print(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"the retrain check failed (exit {result.returncode}); see the log")
    return json.dumps(json.loads(result.stdout))


@dsl.pipeline(
    name="fod-retrain-check",
    description="Retrain the categories whose current data version no model was trained on.",
)
def retrain_check_pipeline(
    git_url: str,
    git_ref: str = "main",
    categories: list = ["widget"],  # noqa: B006 - KFP pipeline parameters need literal defaults
    kfp_host: str = "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
    deploy_target: str = "kserve",
    warm_start: bool = False,
    on_drift: bool = False,
    drift_window: str = "24h",
):
    check = retrain_check(
        git_url=git_url,
        git_ref=git_ref,
        categories=categories,
        kfp_host=kfp_host,
        deploy_target=deploy_target,
        warm_start=warm_start,
        on_drift=on_drift,
        drift_window=drift_window,
    )
    # never cached: a check must look at the data every time
    with_cluster_settings(check).set_caching_options(False)


def compile_check(path: str | Path = COMPILED_YAML) -> Path:
    compiler.Compiler().compile(retrain_check_pipeline, str(path))
    return set_cluster_settings(path, cuda_steps=())


def load_spec(path: str | Path = SPEC) -> dict:
    spec = yaml.safe_load(Path(path).read_text())
    missing = {"name", "cron", "parameters"} - set(spec)
    if missing:
        raise ValueError(f"{path}: missing {', '.join(sorted(missing))}")
    if "git_url" not in spec["parameters"]:
        raise ValueError(f"{path}: parameters.git_url is required")
    return spec


def create_recurring_run(host: str, spec_path: str | Path = SPEC) -> str:
    """Create (or add) the recurring run in KFP from the spec; returns its id."""
    import tempfile

    from pipelines.runner import kfp_call, kfp_client

    spec = load_spec(spec_path)
    client = kfp_client(host)
    experiment = kfp_call(host, lambda: client.create_experiment(spec.get("experiment", "fod")))
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_check(Path(tmp) / "check.yaml")
        run = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=spec["name"],
            description=spec.get("description"),
            cron_expression=spec["cron"],
            max_concurrency=1,  # never two checks at once
            no_catchup=True,  # a cluster that was down does not replay missed checks
            params=spec["parameters"],
            pipeline_package_path=str(package),
            service_account=spec.get("service_account"),
        )
    return run.recurring_run_id
