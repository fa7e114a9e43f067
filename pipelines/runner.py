"""Running the training pipeline: on this machine through the KFP local runner, or on a
KFP endpoint (submit, wait). ``fod pipeline run|submit``, ``fod retrain`` and ``fod demo``
all run it here."""

import logging
import os
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
        except RuntimeError as error:  # a step failed: its error first, the rest is logged
            raise SubmitError(failure_message(report.failure, error, log_path)) from error
    return LocalRunResult(pipeline_root, log_path, report.finished)


def failure_message(failure: tuple[str, str] | None, error: Exception, log_path: Path) -> str:
    """The command's last line for a failed run: the step and its own error (not the
    runner's coloured status line), and where the executor's input and traceback are."""
    from pipelines.progress import plain

    if failure:
        step, message = failure
        return f"step {step} failed: {message} (the run's raw logs: {log_path})"
    return f"{plain(str(error))} (the run's raw logs: {log_path})"


class SubmitError(RuntimeError):
    """The KFP endpoint cannot take the pipeline, or the run did not succeed."""


TOKEN_ENV = "FOD_KFP_TOKEN"  # a person's bearer token for a multi-user KFP
COOKIE_ENV = "FOD_KFP_COOKIE"  # a person's session cookie from the Kubeflow dashboard


def kfp_call(host: str, call):
    """``call()`` against a KFP endpoint; connection and API errors become a SubmitError."""
    try:
        return call()
    except SubmitError:
        raise
    except Exception as error:  # kfp raises urllib3/ApiException types on connection errors
        if getattr(error, "status", None) in (401, 403):
            raise SubmitError(
                f"KFP endpoint {host} refused the request ({error.status}: "
                f"{_api_message(error)}). Multi-user KFP needs an identity: in a pod, the "
                "projected ServiceAccount token (audience pipelines.kubeflow.org) at "
                "KF_PIPELINES_SA_TOKEN_PATH and a RoleBinding in the profile namespace "
                f"(infra/multi-user); by hand, --kfp-token-file, {TOKEN_ENV} or {COOKIE_ENV} "
                "(docs/deploy.md)."
            ) from error
        raise SubmitError(
            f"KFP endpoint {host} is unreachable or refused the client: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error


def _api_message(error) -> str:
    import json

    try:
        return str(json.loads(error.body).get("error") or error.reason)[:300]
    except (TypeError, ValueError, AttributeError):
        return str(getattr(error, "reason", error))[:300]


def kfp_credentials() -> dict:
    """How the client proves who it is, as ``kfp.Client`` keyword arguments.

    A person's token (``FOD_KFP_TOKEN``) first; else a token file, read again at every
    request (the SDK's ``ServiceAccountTokenVolumeCredentials``): the pod's projected
    ServiceAccount token, which the kubelet replaces before it expires (2 h, while a run
    is waited on for up to 6 h), at ``KF_PIPELINES_SA_TOKEN_PATH`` or the SDK's default
    path. A session cookie (``FOD_KFP_COOKIE``) goes with either. The SDK itself reads the
    token file only when no host is given; a CronJob always gives one."""
    from kfp.client import (
        KF_PIPELINES_SA_TOKEN_ENV,
        KF_PIPELINES_SA_TOKEN_PATH,
        ServiceAccountTokenVolumeCredentials,
    )

    credentials = {}
    if cookie := os.environ.get(COOKIE_ENV):
        credentials["cookies"] = cookie
    if token := os.environ.get(TOKEN_ENV):
        return credentials | {"existing_token": token}
    path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV)
    if path and not Path(path).is_file():
        raise SubmitError(
            f"the KFP token file {path} (KF_PIPELINES_SA_TOKEN_PATH) does not exist: in a pod, "
            "mount the projected ServiceAccount token there (infra/retrain); by hand, write "
            "one with `kubectl create token <account> --audience pipelines.kubeflow.org`"
        )
    if path or Path(KF_PIPELINES_SA_TOKEN_PATH).is_file():
        path = path or KF_PIPELINES_SA_TOKEN_PATH
        credentials["credentials"] = ServiceAccountTokenVolumeCredentials(path=path)
    return credentials


def kfp_client(host: str):
    """A client of ``host`` that authenticates as ``kfp_credentials`` says. Multi-user KFP:
    runs go to the profile namespace named by FOD_KFP_NAMESPACE (infra/retrain)."""
    import kfp

    namespace = os.environ.get("FOD_KFP_NAMESPACE") or None
    credentials = kfp_credentials()
    return kfp_call(host, lambda: kfp.Client(host=host, namespace=namespace, **credentials))


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
