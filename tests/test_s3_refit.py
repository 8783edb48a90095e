"""S^3 spends its own time where it pays: each NFE's predictor is refitted exactly at the trial counts its rule
names, the fits run ahead in a background thread without changing what is asked, and before an NFE has a predictor
no children are made beyond the ones picked (random picks need no pool)."""

import copy
from concurrent.futures import Future

import numpy as np
import pytest

from steptune.search import DecisionSpace, make_searcher
from steptune.search.s3 import refit_due
from steptune.space import noise


@pytest.fixture(scope="module")
def space():
    return DecisionSpace(noise.VPLinear(), 1.0, 1e-3)


def smooth_score(space, c) -> float:
    return float(np.std(np.diff(space.lams(c.schedule)))) + 0.01 * c.schedule.steps[0].order


def tell_until(se, space, n: int) -> None:
    """Ask 4 at a time and tell each its smooth score until ``se`` has ``n`` results."""
    while len(se.trials) < n:
        for c in se.ask(4):
            se.tell(c, smooth_score(space, c))


def test_refit_rule_fits_at_min_train_then_every_30_percent_growth_of_at_least_20():
    fits, last = [], None
    for m in range(400):
        if refit_due(m, last, min_train=30):
            fits.append(m)
            last = m
    # 30; then max(1.3 x last, last + 20) rounded up: 50, 70, 91 (90 < 1.3 x 70 = 91), 119, 155, 202, 263, 342
    assert fits == [30, 50, 70, 91, 119, 155, 202, 263, 342]


def test_the_searcher_refits_each_nfe_exactly_when_the_rule_says(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [4, 6], seed=0, predictor="extra-trees",
                       min_train=10, pool=20, presets=("ddim",))
    fitted = {4: [], 6: []}
    while len(se.trials) < 110:
        for c in se.ask(2):  # one per NFE: each NFE's fit is due at the first ask after its count is reached
            se.tell(c, smooth_score(space, c))
        for nfe in fitted:
            m = se._fit_size.get(nfe)
            if m is not None and (not fitted[nfe] or fitted[nfe][-1] != m):
                fitted[nfe].append(m)
    for nfe, sizes in fitted.items():
        expected, last = [], None
        for m in range(sizes[-1] + 1):
            if refit_due(m, last, 10):
                expected.append(m)
                last = m
        assert sizes == expected, (nfe, sizes)
        assert len(sizes) >= 3


def test_no_pool_is_made_before_an_nfe_has_a_predictor(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=1, min_train=1000, pool=50,
                       local=0.0, presets=("ddim",))
    for _ in range(4):
        batch = se.ask(6)
        children = [c for c in batch if c.key not in {s.key for s in se._seeds}]
        assert len(se._pools.get(5, [])) == len(children)
        for c in batch:
            se.tell(c, smooth_score(space, c))
    assert len(se.trials) == 24 and 5 not in se._models


class _Inline:
    """Fits at once, in the asking thread: the earliest a fit made ahead can be ready."""

    def submit(self, fn, *args):
        done = Future()
        done.set_result(fn(*args))
        return done


class _AtTheLastMoment(Future):
    """Fits only when the next ask needs the result: the latest a fit made ahead can be ready."""

    def __init__(self, fn, args):
        super().__init__()
        self.fn, self.args = fn, args

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self.fn(*self.args))
        return super().result()


class _Late:
    def submit(self, fn, *args):
        return _AtTheLastMoment(fn, args)


def asked_keys(space, n_trials: int, **opts) -> list[str]:
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [4, 6], seed=3, min_train=10, pool=30,
                       presets=("ddim",), **opts)
    keys = []
    while len(se.trials) < n_trials:
        batch = se.ask(4)
        keys += [c.key for c in batch]
        for c in batch:
            se.tell(c, smooth_score(space, c))
    return keys


def test_fits_made_ahead_give_the_same_trials_whenever_they_finish(space, monkeypatch):
    """A fit started at one ask and used from the next gives the same search whether it finished at once, in the
    background thread, or only when the next ask waited for it: the searcher is a function of its history."""
    from steptune.search import s3

    threaded = asked_keys(space, 120)
    monkeypatch.setattr(s3, "_fit_thread", _Inline)
    inline = asked_keys(space, 120)
    monkeypatch.setattr(s3, "_fit_thread", _Late)
    late = asked_keys(space, 120)
    assert threaded == inline == late


def test_a_refit_made_ahead_is_used_from_the_next_ask_and_the_first_fit_at_once(space):
    for ahead in (True, False):
        se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=0, min_train=12, pool=20,
                           presets=("ddim",), predictor="extra-trees", fit_ahead=ahead)
        tell_until(se, space, 12)
        se.ask(4)  # the first fit is due at this ask: it ranks at once
        assert se._fit_size.get(5) == 12
        tell_until(se, space, 32)
        se.ask(4)  # the refit at 32 trials (12 + 20) is due here
        assert se._fit_size[5] == (12 if ahead else 32)
        se.ask(4)
        assert se._fit_size[5] == 32
        assert se.fit_cpu_seconds > 0 and (se.background_fit_cpu_seconds > 0) is ahead
        assert se.background_fit_cpu_seconds < se.fit_cpu_seconds  # the first fit was the ask's own


def test_a_copy_with_a_fit_in_flight_asks_what_the_original_asks(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=1, min_train=12, pool=20,
                       presets=("ddim",))
    while se._fitting is None:
        for c in se.ask(4):
            se.tell(c, smooth_score(space, c))
    twin = copy.deepcopy(se)
    assert [c.key for c in twin.ask(4)] == [c.key for c in se.ask(4)]


def test_a_forked_process_fits_ahead_in_a_thread_of_its_own(space):
    """A process forked after the parent's fit thread started (no copy of that thread exists in it), with a fit
    under way at the fork, still gets that fit and its later ones made."""
    import os
    import select
    import signal

    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=1, min_train=12, pool=20,
                       presets=("ddim",), predictor="extra-trees")
    while se._fitting is None or se._fit_size.get(5, 0) < 12:  # the first fit in the ask, the next in the thread
        for c in se.ask(4):
            se.tell(c, smooth_score(space, c))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one more refit made ahead and put in place
        try:
            while se._fit_size[5] < 52:
                for c in se.ask(4):
                    se.tell(c, smooth_score(space, c))
            os.write(write, str(se._fit_size[5]).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 120)  # a bound for a child that hangs, not a pause
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready and os.read(read, 16).decode() == "52"


@pytest.mark.parametrize("ahead", [True, False])
def test_the_first_models_rank_at_once_and_auto_chooses_the_kind_by_the_next_ask(space, ahead):
    """Choosing the kind fits each kind on a split, too slow to wait for: made ahead, the first models are of the
    first kind ``auto`` chooses between and the choice lands at the next ask; without, the ask chooses first."""
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=0, min_train=12, pool=20,
                       presets=("ddim",), auto_kinds=("gbr", "extra-trees"), fit_ahead=ahead)
    tell_until(se, space, 12)
    se.ask(4)
    assert se._fit_size[5] == 12
    if ahead:
        assert se._models[5].kind == "gbr" and se.tau_report == [] and se._chosen is None
    se.ask(4)
    assert [r["trials"] for r in se.tau_report] == [12]
    assert se._models[5].kind == se._chosen == se.tau_report[0]["chosen"]
    assert se._fit_size[5] == 12


@pytest.mark.parametrize("kinds", [("gbr", "extra-trees"), ("extra-trees", "gbr")])
def test_the_kind_chosen_first_refits_the_first_models_only_where_it_is_another_kind(space, kinds, monkeypatch):
    """The first models are fitted at once as the first kind; when the choice that follows keeps that kind, they are
    not fitted again (the same fit gives the same models), and either way the models are then of the chosen kind,
    fitted on the trials the first ones were."""
    from steptune.search import s3

    fits = []
    fit = s3.Predictor.fit

    def counted(self, X, nfes, scores):
        fits.append((self.kind, len(scores)))
        return fit(self, X, nfes, scores)

    monkeypatch.setattr(s3.Predictor, "fit", counted)
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=0, min_train=12, pool=20,
                       presets=("ddim",), auto_kinds=kinds)
    tell_until(se, space, 12)
    se.ask(4)
    se.ask(4)
    chosen = se._chosen
    full = [f for f in fits if f[1] == 12]  # the fits on every trial; the choice's own are on a split
    assert full == ([(kinds[0], 12)] if chosen == kinds[0] else [(kinds[0], 12), (chosen, 12)]), (chosen, fits)
    assert se._models[5].kind == chosen and se._fit_size[5] == 12


def test_auto_with_one_kind_fits_only_that_kind(space):
    se = make_searcher("s3", space.noise, space.t_start, space.t_end, [5], seed=0, min_train=12, pool=20,
                       presets=("ddim",), auto_kinds=["gbr"])
    tell_until(se, space, 40)
    assert se._models[5].kind == "gbr" and se.tau_report == [] and se.state()["predictor"] == "gbr"



@pytest.mark.parametrize("ahead", [True, False])
def test_with_its_budget_known_a_search_skips_the_refits_too_late_to_rank_a_tenth_of_their_trials(space, ahead,
                                                                                                  monkeypatch):
    """The budget changes nothing until a refit is due with fewer than REFIT_WORTH picks per trial of its model left
    to rank (from the next ask on when fitted ahead); that refit and the later ones are not made."""
    from steptune.search import s3

    budget, batch, plans = 200, 4, []
    fit_models = s3.fit_models

    def logged(plan):
        plans.append((len(plan["scores"]), sorted(g for g, (rows, last) in plan["groups"].items()
                                                 if last is not None and refit_due(len(rows), last, 10))))
        return fit_models(plan)

    monkeypatch.setattr(s3, "fit_models", logged)

    def run(known: bool):
        plans.clear()
        se = make_searcher("s3", space.noise, space.t_start, space.t_end, [4, 6], seed=0, predictor="extra-trees",
                           min_train=10, pool=20, presets=("ddim",), fit_ahead=ahead)
        se.budget = budget if known else None
        asked = []
        while len(se.trials) < budget:
            out = se.ask(batch)
            asked.append([c.key for c in out])
            for c in out:
                se.tell(c, smooth_score(space, c))
        return asked, [p for p in plans if p[1]]  # the plans that refit a model

    plain_asked, plain = run(False)
    known_asked, known = run(True)
    # picks per model left when the plan is made at ``told``: the two NFEs share what is left of the budget
    worth = [(told, (budget - told - (batch if ahead else 0)) / 2 >= s3.REFIT_WORTH * told / 2) for told, _ in plain]
    skipped = [told for told, ok in worth if not ok]
    assert skipped and all(not ok for told, ok in worth if told >= skipped[0])  # the last ones, here
    assert known == [p for p in plain if p[0] < skipped[0]]
    # every ask before the first skipped refit's model would have ranked is the same
    same = skipped[0] // batch + (1 if ahead else 0)
    assert len(known_asked) == len(plain_asked) and known_asked[:same] == plain_asked[:same]
