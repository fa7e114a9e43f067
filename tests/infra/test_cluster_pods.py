"""What the cluster's pods really run: the command line after Kubernetes substitutes its
variables, the users their containers run as, and what that lets them do."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from manifests import MODES, ROOT, build, command_line, container_env, index, pod_spec

CRONJOBS = ("fod-retrain", "fod-retrain-on-drift")


@pytest.mark.parametrize(("mode", "cronjob"), list(itertools.product(sorted(MODES), CRONJOBS)))
@pytest.mark.parametrize("categories", ["bottle screw", "bottle,screw", " bottle  screw "])
def test_the_retrain_cronjobs_check_every_category(mode, cronjob, categories):
    """``$(FOD_CATEGORIES)`` reaches ``fod retrain`` as one argument: two names in the
    ConfigMap must still be two categories."""
    from fod_core import cli as core_cli
    from pipelines.cli import add_commands

    objects = index(build(ROOT / mode))
    (container,) = pod_spec(objects["CronJob", "fod", cronjob])["containers"]
    env = container_env(container, objects, "fod", {"FOD_CATEGORIES": categories})
    argv = command_line(container, env)
    assert argv[:2] == ["fod", "retrain"]
    args = core_cli.build_parser(add_commands).parse_args(argv[1:])
    assert args.categories == ["bottle", "screw"]
    assert args.kfp_host == env["KFP_HOST"]


def _image_uid() -> int:
    import re

    return int(re.search(r"--uid (\d+)", (ROOT / "infra/images/Dockerfile").read_text())[1])


def _runs_as(pod: dict, container: dict) -> int | None:
    """The uid a container runs as; None: the image's own user (root for alpine/git)."""
    for context in (container.get("securityContext") or {}, pod.get("securityContext") or {}):
        if "runAsUser" in context:
            return context["runAsUser"]
    return None


CHECKOUTS = [  # (mode, kind, name) of the pods that clone the repository
    (mode, kind, name)
    for mode in sorted(MODES)
    for kind, name in [("Deployment", "fod-review"), *(("CronJob", c) for c in CRONJOBS)]
]


@pytest.mark.parametrize(("mode", "kind", "name"), CHECKOUTS)
def test_the_checkout_is_made_by_the_user_who_works_in_it(mode, kind, name):
    """The init container that clones runs as the user of the containers that use the
    checkout (the image's uid), so the files are theirs."""
    pod = pod_spec(index(build(ROOT / mode))[kind, "fod", name])
    users = {
        c["name"]: _runs_as(pod, c)
        for c in pod["initContainers"] + pod["containers"]
        if c["name"] != "auth-proxy"
    }
    assert set(users.values()) == {_image_uid()}, users


def _git_repository(path: Path) -> str:
    path.mkdir()
    for command in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(path), *command],
            check=True,
        )
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="running the pods' commands as their users needs root (to switch users)",
)


@needs_root
@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "fod-review"), ("CronJob", "fod-retrain")]
)
@pytest.mark.parametrize("as_written", [True, False], ids=["as-written", "init-as-root"])
def test_the_pods_user_can_use_the_checkout(kind, name, as_written):
    """The init container's own command, run here as the user the manifest gives it, on a
    volume like the pod's (fsGroup: group-owned, setgid); then the page's or the check's
    user reads the commit and writes the checkout's config, as ``code_version`` and ``dvc
    config`` do. Run as root instead (the image's default, before the fix), git refuses the
    checkout: the control that shows the test can fail."""
    objects = index(build(ROOT / "infra"))
    pod = pod_spec(objects[kind, "fod", name])
    (init,) = pod["initContainers"]
    main = pod["containers"][0]
    group = pod["securityContext"]["fsGroup"]
    user = _runs_as(pod, main) or _image_uid()
    base = Path(tempfile.mkdtemp(prefix="fod-checkout-"))
    try:
        base.chmod(0o755)  # other users may enter; pytest's own tmp is root's alone
        origin, volume, home = base / "origin", base / "work", base / "home"
        commit = _git_repository(origin)  # the remote: a git server's, whoever clones
        volume.mkdir()
        os.chown(volume, 0, group)
        volume.chmod(0o2775)  # what fsGroup does to the volume
        home.mkdir()
        os.chown(home, user, group)

        env = container_env(init, objects, "fod", {"FOD_GIT_REPO": f"file://{origin}"})
        mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "work")
        argv = command_line(init, env)
        if "command" not in init:
            argv = ["git", *argv]  # alpine/git's entrypoint
        argv = [a.replace(mount, str(volume)) for a in argv]
        uid = _runs_as(pod, init) if as_written else 0
        subprocess.run(["chown", "-R", f"{uid}:{group}", str(origin)], check=True)
        init_env = {
            "HOME": "/root",  # the image's, unless the manifest sets it
            **env,
            "PATH": os.environ["PATH"],
            "FOD_GIT_TOKEN": "unused",
        }
        cloned = subprocess.run(
            argv, env=init_env, user=uid, group=group if uid else 0,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert cloned.returncode == 0, cloned.stderr

        def as_user(*args):
            return subprocess.run(
                ["git", "-C", str(volume / "repo"), *args],
                env={"PATH": os.environ["PATH"], "HOME": str(home)},
                user=user, group=group, capture_output=True, text=True, check=False,
            )  # fmt: skip

        read, write = as_user("rev-parse", "--short=12", "HEAD"), as_user("config", "fod.x", "1")
        if as_written:
            assert (read.returncode, read.stdout.strip()) == (0, commit), read.stderr
            assert write.returncode == 0, write.stderr
        else:
            assert read.returncode != 0 and "dubious ownership" in read.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_a_code_version_without_its_commit_says_why(tmp_path, caplog):
    """A checkout git refuses (owned by another user) records the package version, and the
    warning names git's reason: a silent fallback hid the ownership fault."""
    from components.tracking import code_version

    repo = tmp_path / "repo"
    commit = _git_repository(repo)
    assert code_version(repo) == commit
    subprocess.run(["chown", "-R", f"{_image_uid()}:{_image_uid()}", str(repo)], check=True)
    with caplog.at_level("WARNING", logger="components.tracking"):
        version = code_version(repo)
    assert version.startswith("fod-pipeline==")
    assert "dubious ownership" in caplog.text and str(repo) in caplog.text


@pytest.mark.parametrize("mode", sorted(MODES))
def test_jobs_finish_and_never_block_the_next_under_an_istio_sidecar(mode):
    """In a multi-user profile namespace Istio injects a proxy into every pod. As a plain
    container it outlives the Job's own, the pod never completes, and the CronJob's
    concurrencyPolicy Forbid then holds every later check. Each Job's pod asks for the
    proxy as a native sidecar (Istio 1.24+, Kubernetes 1.29+; docs/deploy.md), and each
    Job has a deadline, so even a pod that hangs frees the schedule."""
    jobs = [o for o in build(ROOT / mode) if o["kind"] in ("Job", "CronJob")]
    assert {o["metadata"]["name"] for o in jobs} >= {"fod-bucket", *CRONJOBS}
    for job in jobs:
        spec = job["spec"]["jobTemplate"]["spec"] if job["kind"] == "CronJob" else job["spec"]
        annotations = spec["template"]["metadata"].get("annotations", {})
        assert annotations.get("sidecar.istio.io/nativeSidecar") == "true", job["metadata"]
        assert spec.get("activeDeadlineSeconds"), job["metadata"]["name"]
    from pipelines.runner import RUN_TIMEOUT

    for job in jobs:
        if job["kind"] == "CronJob":  # the check waits for its run: the deadline is beyond
            assert job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > RUN_TIMEOUT
