"""Ports for servers started by another process: drawn below the kernel's ephemeral range, where
an outgoing connection cannot take one between the pick and the server's bind."""

from __future__ import annotations

import socket

import pytest

from core import ports


def test_a_port_is_free_and_below_the_range_outgoing_connections_use() -> None:
    low, _ = ports.ephemeral_range()
    for _ in range(50):
        port = ports.free_port()
        assert ports.LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_bound_port_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        draws = iter([taken, taken, 20001])
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (32768, 60999))
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(draws))
        assert ports.free_port() == 20001


def test_a_range_that_leaves_no_room_falls_back_to_the_kernels_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: pytest.fail("no room to draw from"))
    assert 0 < ports.free_port() <= 65535


def test_the_kernels_range_is_read_and_a_missing_file_gives_linuxs_default(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "range").write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "PORT_RANGE_FILE", tmp_path / "range")
    assert ports.ephemeral_range() == (40000, 50000)
    monkeypatch.setattr(ports, "PORT_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
