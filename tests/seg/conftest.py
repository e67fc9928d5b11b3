"""Segmentation tests train tiny U-Nets: one torch thread each (see the root conftest)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Applied to every test of this folder."""
