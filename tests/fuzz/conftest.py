"""Fixtures of the robustness tests: one torch thread, and a fresh root logging handler per test (the
CLI's ``logging.basicConfig`` would otherwise keep writing to an earlier test's closed stderr)."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _fresh_root_logging(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
