"""The service manager's notify protocol: one datagram of ``KEY=value`` lines to ``NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import pytest

from core.serving.systemd import notify


@pytest.fixture
def manager(tmp_path, monkeypatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in the environment as systemd names it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind(str(path))
        listening.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield listening


def test_each_message_is_one_datagram_of_lines(manager):
    assert notify("READY=1", "STATUS=Answering in 3 servers")
    assert manager.recv(4096) == b"READY=1\nSTATUS=Answering in 3 servers"
    assert notify("STOPPING=1")
    assert manager.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket_is_named_with_an_at_sign(monkeypatch):
    name = f"flamingo-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind("\0" + name)
        listening.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert listening.recv(4096) == b"READY=1"


def test_without_a_manager_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")


def test_a_manager_that_cannot_be_reached_is_logged_and_the_bot_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="core.serving.systemd"):
        assert not notify("READY=1")
    assert "could not tell the service manager READY=1" in caplog.text
