"""Running the training pipeline: on this machine through the KFP local runner, or on a
KFP endpoint (submit, wait). ``fod pipeline run|submit``, ``fod retrain`` and ``fod demo``
all run it here."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.dag import compile_pipeline, training_pipeline
from pipelines.parameters import checked

log = logging.getLogger(__name__)

RUN_TIMEOUT = 6 * 3600.0  # how long a submitter waits for a KFP run


@dataclass
class LocalRunResult:
    pipeline_root: Path
    log_path: Path  # the KFP runner's raw output
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, status) in order


def run_local(
    arguments: dict,
    pipeline_root: str | Path,
    *,
    verbose: bool = False,
) -> LocalRunResult:
    """Execute the pipeline with the KFP local runner (subprocesses, this Python), reporting
    one line per step; the runner's raw output goes to a log file (``-v``: to the console).

    Components reach the stack through the environment (``StackSettings.export``)."""
    from kfp import local

    from pipelines.progress import log_path_for, reported

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
        enable_caching=True,  # same data, code and parameters: reuse the step's outputs
    )
    log_path = log_path_for(pipeline_root)
    with reported(log_path, verbose=verbose) as report:
        try:
            training_pipeline(**checked(arguments))
        except RuntimeError as error:  # a step failed: its output was shown, the rest is logged
            raise SubmitError(f"{error}; the run's raw logs: {log_path}") from error
    return LocalRunResult(pipeline_root, log_path, report.finished)


class SubmitError(RuntimeError):
    """The KFP endpoint cannot take the pipeline, or the run did not succeed."""


def kfp_call(host: str, call):
    """``call()`` against a KFP endpoint; connection and API errors become a SubmitError."""
    try:
        return call()
    except Exception as error:  # kfp raises urllib3/ApiException types on connection errors
        raise SubmitError(
            f"KFP endpoint {host} is unreachable or refused the client: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error


def kfp_client(host: str):
    """A client of ``host``. Multi-user KFP: runs go to the profile namespace named by
    FOD_KFP_NAMESPACE, and the client authenticates with the projected ServiceAccount token
    at KF_PIPELINES_SA_TOKEN_PATH where the pod has one (infra/retrain)."""
    import os

    import kfp

    namespace = os.environ.get("FOD_KFP_NAMESPACE") or None
    return kfp_call(host, lambda: kfp.Client(host=host, namespace=namespace))


def submit(
    arguments: dict,
    host: str,
    *,
    experiment: str = "fod",
    wait: bool = False,
    timeout: float = RUN_TIMEOUT,
) -> str:
    """Compile and submit the pipeline to a KFP endpoint; optionally wait for success."""
    import tempfile

    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml")
        run = kfp_call(
            host,
            lambda: client.create_run_from_pipeline_package(
                str(package), arguments=arguments, experiment_name=experiment
            ),
        )
    log.info("submitted run %s to %s", run.run_id, host)
    if wait:
        wait_for_run(host, run.run_id, timeout=timeout, client=client)
    return run.run_id


def wait_for_run(host: str, run_id: str, *, timeout: float = RUN_TIMEOUT, client=None) -> None:
    """Until the KFP run ends; SubmitError unless it succeeded."""
    client = client or kfp_client(host)
    detail = kfp_call(host, lambda: client.wait_for_run_completion(run_id, timeout=timeout))
    state = str(getattr(detail, "state", "")).upper()
    if "SUCCEEDED" not in state:
        raise SubmitError(f"KFP run {run_id} ended in state {state or 'unknown'}")
