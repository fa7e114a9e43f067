"""Multi-user KFP accepts only requests that say who sends them. The retrain CronJob's own
command line (from the built manifest) submits and waits with its projected ServiceAccount
token, read again at each request as the kubelet replaces it; a person uses a token file;
without an identity the error says what to give. ``kfp_api.FakeKfpApi`` plays the API
server's authentication on loopback (see its docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp_api import FakeKfpApi
from manifests import ROOT, build, command_line, container_env, index, pod_spec


@pytest.fixture
def kfp_api():
    api = FakeKfpApi(tokens={"token-1"})
    server = api.serve()
    yield api, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _projected_token_path(container: dict, pod: dict, env: dict, root: Path) -> Path:
    """Where the pod's projected token is, mapped under ``root`` on this machine."""
    path = env["KF_PIPELINES_SA_TOKEN_PATH"]
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    projected = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert path == f"{mount['mountPath']}/{projected['path']}"
    local = root / path.lstrip("/")
    local.parent.mkdir(parents=True)
    return local


def test_the_cronjob_submits_and_waits_with_its_projected_token(
    stack, tracked_repo, kfp_api, tmp_path, monkeypatch, capsys
):
    from pipelines.cli import main

    api, url = kfp_api
    objects = index(build(ROOT / "infra/multi-user"))
    pod = pod_spec(objects["CronJob", "fod", "fod-retrain"])
    (container,) = pod["containers"]
    env = container_env(container, objects, "fod", {"FOD_CATEGORIES": "remote", "KFP_HOST": url})
    token = _projected_token_path(container, pod, env, tmp_path)
    token.write_text("token-1\n")

    def kubelet_rotates_the_token(api: FakeKfpApi) -> None:  # after the run is created
        token.write_text("token-2\n")
        api.tokens = {"token-2"}  # the old one expired

    api.on_run_created = kubelet_rotates_the_token
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    monkeypatch.setenv("FOD_KFP_NAMESPACE", env["FOD_KFP_NAMESPACE"])
    monkeypatch.chdir(tracked_repo)  # the pod's workingDir, the checkout
    argv = command_line(container, env)
    assert argv[:2] == ["fod", "retrain"]

    code = main(argv[1:])

    run_id = next(iter(api.runs))
    assert code == 2 and f"KFP run {run_id} ended in state FAILED" in capsys.readouterr().err
    assert [r.code for r in api.requests] == [200] * len(api.requests)  # none refused
    create = next(r for r in api.requests if (r.method, r.path) == ("POST", "/apis/v2beta1/runs"))
    wait = next(r for r in api.requests if r.path == f"/apis/v2beta1/runs/{run_id}")
    assert (create.token, wait.token) == ("token-1", "token-2")  # read again, not cached
    (experiment,) = api.experiments.values()
    assert experiment["namespace"] == env["FOD_KFP_NAMESPACE"] == "fod"


def test_a_person_submits_with_a_token_file(stack, tracked_repo, kfp_api, tmp_path, capsys):
    from pipelines.cli import main

    api, url = kfp_api
    token = tmp_path / "token"
    token.write_text("token-1")
    code = main(["pipeline", "submit", "--host", url, "--dvc-file",
                 str(tracked_repo / "data.dvc"), "--kfp-token-file", str(token)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert f"submitted run {next(iter(api.runs))}" in capsys.readouterr().out
    assert {r.token for r in api.requests} == {"token-1"}


def test_without_an_identity_the_error_says_what_to_give(
    stack, tracked_repo, kfp_api, monkeypatch, capsys
):
    from pipelines.cli import main

    api, url = kfp_api
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    monkeypatch.setenv("FOD_KFP_NAMESPACE", "fod")
    code = main(["pipeline", "submit", "--host", url, "--dvc-file",
                 str(tracked_repo / "data.dvc")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and not api.runs
    assert "refused the request (401" in err and "there is no user identity header" in err
    assert "KF_PIPELINES_SA_TOKEN_PATH" in err and "--kfp-token-file" in err
