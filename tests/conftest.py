"""Shared test setup: one thread per worker, no network, deterministic seeds."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

_real_socket = socket.socket


class _GuardedSocket(_real_socket):
    """Blocks internet sockets only: DataLoader workers and torch.distributed (gloo on
    loopback) use Unix sockets / loopback, which stay allowed."""

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
                raise RuntimeError(f"tests must not use the network (tried to connect to {address})")
        return super().connect(address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket, "socket", _GuardedSocket)
    yield


@pytest.fixture(autouse=True)
def _seed_and_grad_mode():
    torch.manual_seed(0)
    yield
    # in-process CLI tests must not leak global autograd state into later tests
    assert torch.is_grad_enabled(), "a test (or the code it ran) left autograd disabled"


@pytest.fixture(scope="module")
def built():
    """The native sparse kernels, built and enabled (skips where there is no C++ compiler)."""
    from sact.sparse import native

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine uses the pure-PyTorch kernels")
    assert native.available(), native.load_error()
    prev = native.set_enabled(True)
    yield
    native.set_enabled(prev)
