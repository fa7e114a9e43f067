"""The embedded stack: real processes on 127.0.0.1, idempotent, clear errors."""

from __future__ import annotations

import socket
import stat

import pytest

from components.errors import StackError
from components.local.stack import EmbeddedStack
from components.settings import StackSettings
from components.storage import S3Store, StorageError


def test_stack_is_healthy_and_idempotent(stack):
    status = stack.status()
    assert status["running"], status
    state = stack.read_state()
    assert stack.up() == stack.settings()  # a second `up` changes nothing
    assert stack.read_state().s3.pid == state.s3.pid
    assert stack.read_state().mlflow.pid == state.mlflow.pid


def test_services_listen_on_loopback_only(stack):
    import psutil

    state = stack.read_state()
    for pid in (state.s3.pid, state.mlflow.pid):
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
        addresses = {
            c.laddr.ip
            for p in family
            for c in p.connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert addresses and addresses <= {"127.0.0.1"}, addresses


def test_credentials_are_generated_private(stack):
    path = stack.home / "credentials.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "AWS_SECRET_ACCESS_KEY=" in path.read_text()


def test_s3_round_trip_and_wrong_credentials(settings):
    store = S3Store(settings, "tests/roundtrip")
    store.put("a/b.bin", b"\x00payload")
    assert store.get("a/b.bin") == b"\x00payload"
    assert store.get("absent") is None
    wrong = StackSettings(**{**settings.__dict__, "secret_key": "wrong"})
    with pytest.raises(StorageError, match="refused the credentials"):
        S3Store(wrong, "tests").get("a/b.bin")


def test_s3_down_is_a_clear_error(settings):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = StackSettings(**{**settings.__dict__, "s3_endpoint": f"http://127.0.0.1:{port}"})
    with pytest.raises(StorageError, match="unreachable"):
        S3Store(down, "features").check()


def test_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} .* is taken"):
            EmbeddedStack(tmp_path, s3_port=port, mlflow_port=0).up()


def test_the_bucket_is_created_once_on_a_fresh_s3(stack, monkeypatch, capsys):
    """What infra/storage's Job runs on a cluster's first start: `fod stack bucket`."""
    from pipelines.cli import main

    monkeypatch.setenv("FOD_BUCKET", "fresh-bucket")
    assert main(["stack", "bucket"]) == 0
    assert "bucket fresh-bucket created" in capsys.readouterr().out
    assert main(["stack", "bucket"]) == 0
    assert "bucket fresh-bucket exists" in capsys.readouterr().out
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["stack", "bucket"]) == 2
    assert "refused the credentials" in capsys.readouterr().err


def test_an_inner_port_taken_before_seaweedfs_binds_it_is_picked_again(
    tmp_path, monkeypatch, caplog
):
    """SeaweedFS gets 12 inner ports picked free beforehand; one can be taken before it binds
    (another stack starting, or an outgoing connection). The start picks new ports, not fail.
    The pick is steered onto a port held here: the race itself cannot be timed in a test."""
    import logging

    import components.local.stack as stack_module

    real_free_port = stack_module.free_port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        calls = []

        def first_pick_taken() -> int:
            calls.append(1)
            return taken if len(calls) == 9 else real_free_port()  # s3.port.iceberg, once

        monkeypatch.setattr(stack_module, "free_port", first_pick_taken)
        stack = EmbeddedStack(tmp_path, s3_port=0, mlflow_port=0)
        with caplog.at_level(logging.WARNING, logger="components.local.stack"):
            try:
                stack.up()
                assert stack.status()["running"]
            finally:
                stack.down()
    assert "a port was taken before it bound" in caplog.text


def test_a_port_lost_after_seaweedfs_checked_it_is_found_under_its_stacks(tmp_path):
    """A listener that fails after SeaweedFS's own port check logs one fatal line, then pages
    of goroutine stacks (seen in CI). The retry reads the whole attempt's log, and the error a
    user sees leads with the fatal line, not with stacks."""
    from components.local.processes import log_tail
    from components.local.stack import _port_was_taken

    log = tmp_path / "s3.log"
    log.write_text("an earlier start: address already in use\n")
    start = log.stat().st_size
    stacks = [f"github.com/seaweedfs/seaweedfs/weed/x.go:{n} +0x{n:x}" for n in range(40)]
    healthy_start = ["I1204 21:27:34.1 master.go:1 Start Seaweed Master", *stacks]
    with log.open("a") as handle:
        handle.write("\n".join(healthy_start) + "\n")
    assert not _port_was_taken(str(log), start)  # the earlier start's words are not this one's

    fatal = "F1204 21:27:35.2 volume.go:629 Volume server fail to serve: listen tcp: bind"
    with log.open("a") as handle:
        handle.write("\n".join([fatal, *stacks]) + "\n")
    assert _port_was_taken(str(log), start)
    shown = log_tail(str(log)).splitlines()
    assert shown[0] == fatal
    assert shown[-1] == stacks[-1]
