"""Pre-flight (issue 27): before its work a step checks the services it needs, in about a
second, and a service that is down stops it at once with one line: which service, where,
what to do. Real services on loopback: the session's stack, a port nothing listens on,
and a stack of its own whose SeaweedFS is stopped behind a running MLflow."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from components.local.processes import free_port
from components.preflight import PROBE_TIMEOUT, ServiceDown, preflight


def test_a_healthy_stack_passes_in_seconds(settings):
    seconds = preflight(settings, s3=True, mlflow=True, artifacts=True)
    assert seconds < 2 * PROBE_TIMEOUT  # under 2 s alone here, 2.5 s beside other tests


def _fails(settings, **services) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(ServiceDown) as error:
        preflight(settings, **services)
    return str(error.value), time.perf_counter() - started


def test_s3_down_names_s3_where_and_the_remedy(settings):
    endpoint = f"http://127.0.0.1:{free_port()}"
    message, seconds = _fails(replace(settings, s3_endpoint=endpoint), s3=True)
    assert message.startswith(f"S3 at {endpoint} is unreachable")
    assert "`fod stack up`" in message and "\n" not in message
    assert seconds < 3 * PROBE_TIMEOUT


def test_wrong_keys_and_a_missing_bucket_say_which_setting(settings, monkeypatch):
    message, _ = _fails(replace(settings, secret_key="not-the-key"), s3=True)
    assert "refused the credentials for bucket" in message
    message, _ = _fails(replace(settings, bucket="no-such-bucket"), s3=True)
    assert "has no bucket no-such-bucket: `fod stack bucket`" in message
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a cluster: the settings
    message, _ = _fails(replace(settings, secret_key="not-the-key"), s3=True)
    assert "FOD_S3_ENDPOINT in the ConfigMap fod-settings" in message
    assert "the Secret fod-s3-credentials" in message


def test_mlflow_down_names_mlflow(settings):
    uri = f"http://127.0.0.1:{free_port()}"
    message, seconds = _fails(replace(settings, mlflow_uri=uri), mlflow=True)
    assert message.startswith(f"MLflow at {uri} does not answer (connection refused)")
    assert "`fod stack up`" in message and seconds < 3 * PROBE_TIMEOUT


@pytest.mark.slow
def test_mlflows_artifact_store_down_is_named_as_such(tmp_path):
    """MLflow answers, the S3 behind its artifact proxy does not: the write MLflow passes
    on fails, and the message names the artifact store, not MLflow's API."""
    from components.local.stack import EmbeddedStack

    stack = EmbeddedStack(tmp_path / "home", s3_port=0, mlflow_port=0)
    settings = stack.up()
    try:
        preflight(settings, s3=True, artifacts=True)
        EmbeddedStack._stop_server(stack.read_state().s3)
        message, seconds = _fails(settings, mlflow=True, artifacts=True)
        assert message.startswith("MLflow's artifact store is down"), message
        assert "the S3 behind it" in message and seconds < 60
        message, _ = _fails(settings, s3=True)
        assert message.startswith(f"S3 at {settings.s3_endpoint} is unreachable")
        # during a step's work: MLflow's bounded retries, then the same reading (a client
        # of its own: the fluent API's tracking URI is process-wide, other tests share it)
        from mlflow import MlflowClient

        from components.preflight import MLFLOW_RETRIES, mlflow_calls

        client = MlflowClient(settings.mlflow_uri)
        run = client.create_run(client.create_experiment("preflight"))
        artifact = tmp_path / "model.txt"
        artifact.write_text("trained")
        started = time.perf_counter()
        with pytest.raises(ServiceDown) as error, mlflow_calls(settings, "training"):
            client.log_artifact(run.info.run_id, str(artifact))
        seconds = time.perf_counter() - started
        assert str(error.value).startswith(
            f"training: MLflow's artifact store is down (after {MLFLOW_RETRIES} retries"
        )
        # bounded: MLflow's own default (7 retries, backoff up to 120 s) takes minutes; each
        # try also waits for the MLflow server's own S3 retries, hence the margin
        assert seconds < 150, seconds
    finally:
        stack.down()
