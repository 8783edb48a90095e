import pytest
import torch

torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _private_default_database(tmp_path, monkeypatch):
    """A command run without --db writes to a database of its own test, never to runs/steptune.db."""
    monkeypatch.setenv("STEPTUNE_DB", f"sqlite:///{tmp_path / 'default.db'}")
