"""Cache keys and fingerprints keep their values (files cached by earlier versions are still found), the cache
files are written whole and read back, and a problem's own ``reference_states`` is what schedules are measured
against."""

import pytest
import sklearn
import torch

from steptune.evaluators import Evaluator, Plug, digits_mixture, get_problem, load_problem, mixture_problem
from steptune.evaluators.cache import atomic_torch_save, load_cached, tensor_sha256
from steptune.evaluators.neural_reference import converged_states
from steptune.evaluators.plugins import conditioning_fingerprint, network_fingerprint
from steptune.evaluators.problems import Problem, ring_mixture
from steptune.evaluators.reference import ReferenceStates, reference_solution
from steptune.search import dc
from steptune.space import presets

# computed by the code before the evaluators were reorganised; a cache written then must be found now
EXACT_REFERENCE_FILE = "fe0b4a1a5ce46516aa0ea86f31ea81211242d1e10a5e5a4911c2a12887316df6.pt"
NEURAL_REFERENCE_FILE = "952e3ed369de25264d922ab25463b837c49f358817ee523b9e99a9bd5bb65c33.pt"
NETWORK_SHA256 = "206b516c6a85cb5c5914acdfffc26a30990918aa8c97f65264f6773f8312aaef"
CONDITIONING_SHA256 = "83a40c64b809a419a731c5295b63b1c4fc78d81fd06e77db6ff612d8bac4b581"
RING_SHA256 = "494405bef511085d06b2c31ce0166c42be0e0fb352f93faf67c9155fe50de2a5"
ARANGE_SHA256 = "9ba25826a6842a08628b75b92c1d8bf02b66ca7a2177699c19bac9415f453bba"
DIGITS_MIXTURE_FILE = "digits-7a50d89d68f2d3c021c2dc3d.pt"  # with sklearn's version read as "1.0-pin"


class PinnedNet(torch.nn.Module):
    """A network with fixed weights and a buffer: its fingerprint does not depend on any random state."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -0.25], [0.125, 0.75]]))
            self.lin.bias.copy_(torch.tensor([0.1, -0.2]))
        self.register_buffer("scale", torch.tensor([1.5]))

    def forward(self, x, time, shift=None):
        out = 0.9 * x + 0.1 * self.lin(x) * self.scale
        return out if shift is None else out + 0.01 * shift


def pinned_factory():
    return Plug(network=PinnedNet(), shape=(2,), cond_kwargs={"shift": torch.tensor([[1.0, 2.0]])},
                uncond_kwargs={"shift": torch.zeros(1, 2)}, guidance_scale=2.0)


def test_exact_reference_is_cached_under_its_earlier_name(tmp_path):
    ev = Evaluator(get_problem("gmm-2d", "vp-linear"), n_train=8, n_heldout=4, cache_dir=tmp_path)
    ev.reference("train")
    assert [p.name for p in (tmp_path / "reference").glob("*.pt")] == [EXACT_REFERENCE_FILE]


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_network_reference_is_cached_under_its_earlier_name(tmp_path):
    problem = load_problem("test_evaluators_cache:pinned_factory")
    assert problem.code_sha256 is not None  # this file defines the network: its text keys the cache too
    problem.code_sha256 = None  # as for a network an installed package defines
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states, loaded = problem.reference_states(x, [problem.t_start, 0.5, problem.t_end], bank={"name": "pin"},
                                              cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "reference").glob("*.pt")] == [NEURAL_REFERENCE_FILE] and not loaded
    again = problem.reference_states(x, [problem.t_start, 0.5, problem.t_end], bank={"name": "pin"},
                                     cache_dir=tmp_path)
    assert again.loaded and all(torch.equal(a, b) for a, b in zip(again.states, states))


@pytest.mark.usefixtures("float64")  # compared with a reference to round-off
def test_fingerprints_keep_their_values():
    assert network_fingerprint(PinnedNet()) == NETWORK_SHA256
    cond = conditioning_fingerprint({"shift": torch.tensor([[1.0, 2.0]])}, {"shift": torch.zeros(1, 2), "k": 3})
    assert cond == CONDITIONING_SHA256
    assert ring_mixture().fingerprint() == RING_SHA256
    assert tensor_sha256(torch.arange(6.0).reshape(2, 3)) == ARANGE_SHA256


def test_fitted_digits_mixture_is_found_under_its_earlier_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sklearn, "__version__", "1.0-pin")
    stored = ring_mixture()
    atomic_torch_save(stored.state_dict(), tmp_path / "gmm" / DIGITS_MIXTURE_FILE)
    assert digits_mixture(2, cache_dir=tmp_path).fingerprint() == stored.fingerprint()  # read, not refitted


def test_cache_files_are_written_whole_and_damaged_ones_ignored(tmp_path):
    path = atomic_torch_save({"x": torch.arange(3.0)}, tmp_path / "a" / "b.pt")
    assert [p.name for p in path.parent.iterdir()] == ["b.pt"]
    assert torch.equal(load_cached(path)["x"], torch.arange(3.0))
    assert load_cached(path, lambda s: s["missing"]) is None
    path.write_bytes(b"not a torch file")
    assert load_cached(path) is None and load_cached(tmp_path / "none.pt") is None and load_cached(None) is None


def test_exact_reference_states_follow_the_ode_segment_by_segment(tmp_path):
    problem = get_problem("gmm-2d", "vp-cosine")
    x = problem.sample_prior(5, torch.Generator().manual_seed(3))
    times = [problem.t_start, 0.6, 0.3, problem.t_end]
    states, loaded = problem.reference_states(x, times, cache_dir=tmp_path)
    expected, y = [], x
    for t0, t1 in zip(times, times[1:]):
        y = reference_solution(problem, y, t0, t1)
        expected.append(y)
    assert not loaded and all(torch.equal(a, b) for a, b in zip(states, expected))
    assert problem.reference_states(x, times, cache_dir=tmp_path).loaded


def test_network_reference_states_are_the_converged_solve():
    problem = load_problem("test_evaluators_cache:pinned_factory")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = [problem.t_start, 0.4, problem.t_end]
    states, _ = problem.reference_states(x, times)
    expected, _ = converged_states(problem.model, x, times, problem.reference_settings)
    assert all(torch.equal(a, b) for a, b in zip(states, expected))


class ShiftedReference(Problem):
    """An exact problem whose reference states are declared to be the start plus the end time (a stand-in for
    any problem that knows its own references)."""

    def reference_states(self, x_T, times, **kwargs):
        return ReferenceStates([x_T.to(torch.float64) + t for t in times[1:]], False)


def shifted(problem: Problem) -> ShiftedReference:
    return ShiftedReference(name=problem.name, noise=problem.noise, model=problem.model, shape=problem.shape,
                            mixture=problem.mixture, source=problem.source)


def test_evaluator_and_dc_fits_measure_against_the_problem_s_reference_states():
    problem = shifted(mixture_problem(ring_mixture()))
    ev = Evaluator(problem, n_train=6, n_heldout=4, cache_dir=None)
    assert torch.equal(ev.reference("train"), ev.x_T("train") + problem.t_end)
    schedule = presets.dpmpp_2m(4, problem.noise, t_start=problem.t_start, t_end=problem.t_end)
    x, targets = dc.fit_targets(ev, schedule, 3)
    assert all(torch.equal(t, x + s) for t, s in zip(targets, schedule.times[1:]))
