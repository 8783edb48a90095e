import pytest
import torch


@pytest.fixture(autouse=True)
def _private_default_database(tmp_path, monkeypatch):
    """A command run without --db writes to a database of its own test, never to runs/steptune.db."""
    monkeypatch.setenv("STEPTUNE_DB", f"sqlite:///{tmp_path / 'default.db'}")


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test: for comparisons with a reference to round-off. Every
    other test runs in the default float32 that the command line and real networks run in."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
