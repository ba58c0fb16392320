"""Shared fixtures for curvkit's tests.

The helper modules ``_models`` and ``_reference`` live next to this file; the directory is
put on ``sys.path`` so every test module (also those in sub-folders) can import them.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def core_registry():
    """A registry with the core's components only (no entry points, no bundled plugins)."""
    import curvkit

    return curvkit.build_registry(autoload=False)


@pytest.fixture
def clean_plugin_env(monkeypatch):
    """Remove the plugin environment variables for the duration of a test."""
    from curvkit.plugins import AUTOLOAD_ENV, BLOCK_ENV

    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    return monkeypatch
