"""A real embedded stack (SeaweedFS S3 + MLflow server) on loopback with free ports."""

from __future__ import annotations

import os

import pytest

from components.stack import EmbeddedStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    stack = EmbeddedStack(tmp_path_factory.mktemp("fod-home"), s3_port=0, mlflow_port=0)
    settings = stack.up()
    saved = {key: os.environ.get(key) for key in settings.env()}
    settings.export()  # components (and KFP's subprocesses) find the stack here
    yield stack
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stack.down()


@pytest.fixture(scope="session")
def settings(stack):
    return stack.settings()
