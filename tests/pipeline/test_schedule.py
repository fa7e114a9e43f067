"""The cluster side of the schedule: the KFP recurring run's pipeline and spec, and the
settings every step gets from the ConfigMap and Secret of infra/base."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.settings import (
    CLUSTER_CONFIG_KEYS,
    CLUSTER_CONFIG_MAP,
    CLUSTER_SECRET,
    CLUSTER_SECRET_KEYS,
)
from pipelines.dag import COMPILED_YAML as TRAINING_YAML
from pipelines.schedule import COMPILED_YAML, SPEC, compile_check, load_spec

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_compiled_check_pipeline_is_current(tmp_path, monkeypatch):
    for variable in ("FOD_IMAGE", "FOD_CUDA_IMAGE"):  # the defaults are checked in
        monkeypatch.delenv(variable, raising=False)
    fresh = compile_check(tmp_path / "check.yaml")
    fresh_docs = list(yaml.safe_load_all(fresh.read_text()))
    assert fresh_docs == list(yaml.safe_load_all(COMPILED_YAML.read_text())), (
        "pipelines/fod_retrain_check.yaml is stale: run `fod schedule compile`"
    )


def test_recurring_run_spec_matches_the_pipeline():
    spec = load_spec(SPEC)
    pipeline = next(yaml.safe_load_all(COMPILED_YAML.read_text()))
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert set(spec["parameters"]) <= set(inputs)
    assert len(spec["cron"].split()) == 6  # KFP's cron format has a seconds field


def _platform_env(path: Path) -> dict[str, dict]:
    documents = list(yaml.safe_load_all(path.read_text()))
    platform = next(d for d in documents if "platforms" in d)
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_step_gets_the_cluster_settings_from_configmap_and_secret():
    config_map = next(
        d
        for d in yaml.safe_load_all((INFRA / "settings" / "settings.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )
    assert config_map["metadata"]["name"] == CLUSTER_CONFIG_MAP
    assert set(config_map["data"]) == set(CLUSTER_CONFIG_KEYS)
    for compiled in (TRAINING_YAML, COMPILED_YAML):
        executors = yaml.safe_load_all(compiled.read_text())
        names = next(executors)["deploymentSpec"]["executors"]
        platform = _platform_env(compiled)
        assert set(platform) == set(names), compiled.name
        for executor in platform.values():
            secret = executor["secretAsEnv"][0]
            assert secret["secretName"] == CLUSTER_SECRET
            assert {e["envVar"] for e in secret["keyToEnv"]} == set(CLUSTER_SECRET_KEYS)
            config = executor["configMapAsEnv"][0]
            assert config["configMapName"] == CLUSTER_CONFIG_MAP


def test_creating_the_schedule_on_an_unreachable_kfp_is_a_clear_error(capsys):
    from components.local.processes import free_port
    from pipelines.cli import main

    code = main(["schedule", "create", "--host", f"http://127.0.0.1:{free_port()}"])
    assert code == 2
    assert "is unreachable" in capsys.readouterr().err


def test_the_check_body_runs_without_the_module_around_it(tmp_path):
    """KFP ships only the function's source to the container: a name imported at module
    level (once ``Path``) is a NameError there. Run the body alone, as the container does,
    against a repository without data.dvc: it must fail on the data, not on a name."""
    import inspect
    import subprocess
    import textwrap

    from pipelines.schedule import retrain_check

    origin = tmp_path / "origin"
    origin.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (origin / "README").write_text("no data.dvc here\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)

    source = inspect.getsource(retrain_check.python_func)
    body = "\n".join(line for line in source.splitlines() if not line.startswith("@"))
    namespace: dict = {}
    exec(textwrap.dedent(body), namespace)  # builtins only, like the container's module
    with pytest.raises(Exception) as raised:
        namespace["retrain_check"](
            git_url=str(origin),
            git_ref="main",
            categories=["widget"],
            kfp_host="http://127.0.0.1:9",
            deploy_target="none",
            warm_start=False,
        )
    assert not isinstance(raised.value, NameError), raised.value


def test_the_check_runs_through_the_kfp_local_runner(settings, tmp_path, capfd):
    """The recurring run's one step, run by ``kfp.local`` as a cluster runs it: from its own
    source, cloning a git repository whose data.dvc is a new data version. It gets as far as
    submitting to KFP, which does not exist here, and fails there, with that message."""
    import subprocess

    from kfp import local

    from components.data_version import DvcRepo
    from components.local.processes import free_port
    from fod_core.synthetic import make_synthetic_dataset
    from pipelines.schedule import retrain_check_pipeline

    origin = tmp_path / "origin"
    make_synthetic_dataset(
        origin / "data", "scheduled", n_train=2, n_test_good=1, n_test_defect=1, size=64, seed=4
    )
    repo = DvcRepo(origin)
    repo.ensure(settings)
    repo.add_and_push(origin / "data")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "data.dvc", ".dvc/config"], check=True)
    subprocess.run([*git, "commit", "-qm", "data"], check=True)

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=False,
    )
    retrain_check_pipeline(
        git_url=str(origin),
        categories=["scheduled"],
        kfp_host=f"http://127.0.0.1:{free_port()}",
        deploy_target="kserve",
    )
    output = capfd.readouterr()
    log = output.out + output.err
    assert "NameError" not in log
    assert "new data" in log or "first training" in log, log[-4000:]  # data.dvc, registry read
    assert "is unreachable" in log, log[-3000:]
