import signal

import pytest
import torch


def pytest_configure(config):
    """A suite started in the background by a shell without job control inherits SIGINT ignored, and so would
    every command the tests interrupt with it: catching it here makes the commands start with it delivered."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _private_default_database(tmp_path, monkeypatch):
    """A command run without --db writes to a database of its own test, never to runs/steptune.db."""
    monkeypatch.setenv("STEPTUNE_DB", f"sqlite:///{tmp_path / 'default.db'}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small tensors and tiny networks: intra-op threads only wait on each other
    there (seconds on a busy machine). Used by ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test: for comparisons with a reference to round-off. Every
    other test runs in the default float32 that the command line and real networks run in."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def no_tf32():
    """Full float32 on CUDA for a GPU test: TF32 convolutions and matmuls would differ from the CPU by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
