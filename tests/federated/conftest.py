import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Two cores shared with the other tests: keep torch to one thread."""
