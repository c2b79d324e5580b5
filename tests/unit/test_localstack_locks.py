"""The local stack's small guarantees: a crashed server's TIME_WAIT sockets do not make its
port look taken; concurrent provisioning/``stack up`` calls take turns."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from streamcrawl.localstack import stack
from streamcrawl.localstack.stack import LocalStack, StackError, new_cluster_id


def _time_wait_port() -> int:
    """A port whose last connection the server side closed first (so it sits in
    TIME_WAIT on that port), with nothing listening any more. The listener sets
    SO_REUSEADDR as the JVM's and Go's servers (Kafka, FerretDB) do."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = int(listener.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    return port


def test_a_port_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    port = _time_wait_port()
    plain = socket.socket()
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: it tripped here
    plain.close()
    LocalStack._check_free("Kafka", "STREAMCRAWL_STACK_KAFKA_PORT", port)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        with pytest.raises(StackError, match="taken by another process"):
            LocalStack._check_free("Kafka", "STREAMCRAWL_STACK_KAFKA_PORT", taken)


_HOLDER = """
import sys, time
from pathlib import Path
from streamcrawl.localstack.provision import exclusive
lock, log, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with exclusive(lock):
    with open(log, "a") as out:
        out.write(f"{name} in {time.monotonic()}\\n")
    time.sleep(0.5)
    with open(log, "a") as out:
        out.write(f"{name} out {time.monotonic()}\\n")
"""


def test_concurrent_holders_of_the_provisioning_lock_take_turns(tmp_path: Path) -> None:
    lock, log = tmp_path / "cache" / ".provision.lock", tmp_path / "log"
    holders = [
        subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock), str(log), name])
        for name in ("a", "b", "c")
    ]
    assert [holder.wait(30) for holder in holders] == [0, 0, 0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 6
    # Each "in" is followed by the same holder's "out": no two inside at once.
    for first, second in zip(events[::2], events[1::2], strict=True):
        assert (first[1], second[1], first[0]) == ("in", "out", second[0])


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 encodes to "-" in URL-safe base64: Kafka's storage tool would read such an id
    # as an option and refuse to format the log directory.
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" + bytes(15))])
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(drawn))
    assert new_cluster_id() == "AQAAAAAAAAAAAAAAAAAAAA"
