"""The built infra/ manifests as a cluster would receive them (``kubectl kustomize``), and
what a pod's container really runs once Kubernetes has substituted its variables."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# Where each mode runs the pipeline's pods, and where the InferenceServices live.
MODES = {"infra": ("kubeflow", "fod"), "infra/multi-user": ("fod", "fod")}


def build(directory: Path) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def index(objects: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects
    }


def pod_spec(obj: dict) -> dict:
    """The pod template of a Deployment, Job or CronJob."""
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def container_env(
    container: dict, objects: dict, namespace: str, overrides: dict | None = None
) -> dict:
    """The environment a container starts with: its envFrom ConfigMaps (as built, changed
    by ``overrides``), then its own literal values."""
    env = {}
    for source in container.get("envFrom", []):
        if ref := source.get("configMapRef"):
            env |= objects["ConfigMap", namespace, ref["name"]].get("data", {})
    env |= overrides or {}
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def command_line(container: dict, env: dict) -> list[str]:
    """``command`` + ``args`` with ``$(VAR)`` replaced as the kubelet does: each reference
    by its value inside the one argument (no word splitting), ``$$`` an escaped ``$``, an
    unknown name left as written."""

    def expand(argument: str) -> str:
        return re.sub(
            r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
            lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
            argument,
        )

    return [expand(a) for a in container.get("command", []) + container.get("args", [])]
