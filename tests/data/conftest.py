"""Fixtures for the data tests: the shared CIFAR-10 JPEG export and a network guard."""

import os
import socket
from pathlib import Path

import pytest

_CIFAR10_JPEG = Path(os.environ.get("DFQ_CIFAR10_JPEG", "/work/shared/data/cifar10-jpeg"))


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
  """Root of the shared CIFAR-10 JPEG export (read-only); skips the test if absent."""
  if not (_CIFAR10_JPEG / "test").is_dir():
    pytest.skip(f"shared CIFAR-10 JPEG export not found at {_CIFAR10_JPEG} (set DFQ_CIFAR10_JPEG)")
  return _CIFAR10_JPEG


def _refuse(*args, **kwargs):
  raise AssertionError(f"network access attempted in a test: {args[:2]}")


@pytest.fixture
def no_network(monkeypatch):
  """Any socket connect fails at once (TFDS would otherwise retry for minutes)."""
  monkeypatch.setattr(socket.socket, "connect", _refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
  monkeypatch.setattr(socket, "create_connection", _refuse)
  monkeypatch.setattr(socket, "getaddrinfo", _refuse)
