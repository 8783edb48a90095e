"""Re-timing and interpolation: valid schedules for every preset on any grid, the identity on a schedule's own grid,
decisions by relative lambda position, the analytical first step only from pure noise, and interpolated schedules
between searched NFEs at the asked NFE."""

import dataclasses

import numpy as np
import pytest
import torch

from steptune.space import ScheduleError, presets
from steptune.space import noise as noise_mod
from steptune.space.retime import interpolate, positions, retime

NOISES = ("vp-linear", "ddpm-linear", "edm", "flow")


def grid(ns, n, t0, t1, warp=1.0):
    lam = ns.lam(torch.tensor([t0, t1], dtype=torch.float64))
    u = torch.linspace(0, 1, n + 1, dtype=torch.float64) ** warp
    ts = ns.t_of_lambda(lam[0] + u * (lam[1] - lam[0])).tolist()
    ts[0], ts[-1] = t0, t1
    return ts


def ends(ns):
    from steptune.evaluators.problems import default_t_start

    return default_t_start(ns), float(ns.t_min)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("name", presets.names())
def test_every_preset_retimes_validly_and_is_unchanged_on_its_own_grid(noise, name):
    ns = noise_mod.get(noise)
    t0, t1 = ends(ns)
    for nfe in (3, 6):
        s = presets.build(name, nfe, ns, t_start=t0, t_end=t1)
        same = retime(s, s.times)
        assert same.key() == s.key() and same.nfe == s.nfe
        for n, start, end, warp in ((2, t0, t1, 1.0), (9, t0, t1, 1.3), (5, 0.5 * t0, t1, 0.8), (4, t0, 0.0, 1.0)):
            times = grid(ns, n, start, end if end > 0 else t1, warp)
            if end == 0.0:
                times = [*times[:-1], 0.0]
            r = retime(s, times, from_noise=start == t0)
            r.validate()
            assert len(r.steps) == n and r.times == pytest.approx(times, rel=0, abs=0)
            assert r.afs == (s.afs if start == t0 else "none")


def test_decisions_come_from_the_step_at_the_nearest_relative_lambda_position():
    ns = noise_mod.get("vp-linear")
    s = presets.build("dpm-solver++-3m", 8, ns, t_start=1.0, t_end=1e-3)
    orders = [st.order for st in s.steps]
    assert orders == [1, 2, 3, 3, 3, 3, 2, 1]
    r = retime(s, grid(ns, 4, 1.0, 1e-3))  # ends at positions 1/4 .. 1 -> old steps 1, 3, 5, 7 (ends at 2/8 ..)
    assert [st.order for st in r.steps] == [1, 2, 3, 1]  # step 0 is clipped to the one point it has
    assert r.steps[2].second_scale == s.steps[5].second_scale
    half = retime(s, grid(ns, 8, 0.3, 1e-3), from_noise=False)  # img2img: the same positions on a shorter interval
    assert [st.order for st in half.steps] == orders


def test_positions_run_from_0_to_1_in_lambda_also_through_infinite_ends():
    ns = noise_mod.get("flow")
    r = positions(ns, [1.0, 0.5, 0.1, 0.0])
    assert r[0] == 0.0 and r[-1] == 1.0 and r[1] == pytest.approx(0.5, abs=1e-12) and np.all(np.diff(r) > 0)


def test_a_bad_grid_is_refused_with_the_entry():
    ns = noise_mod.get("vp-linear")
    s = presets.build("ddim", 4, ns)
    with pytest.raises(ScheduleError, match="entry 2"):
        retime(s, [1.0, 0.5, 0.6, 0.1])
    with pytest.raises(ScheduleError, match="at least 2"):
        retime(s, [1.0])


def searched(ns, nfe, seed):
    from steptune.search.space import DecisionSpace

    space = DecisionSpace(ns, 1.0, 1e-3, afs_kinds=("none", "zero"))
    rng = np.random.default_rng(seed)
    out = None
    while out is None:
        out = space.random(nfe, rng)
    return out


def test_interpolated_schedules_cost_the_asked_nfe_and_lie_between_their_neighbours():
    ns = noise_mod.get("vp-linear")
    study = {n: searched(ns, n, n) for n in (5, 6, 8, 10)}
    for nfe in (4, 7, 9, 12):
        s = interpolate(study, nfe, method="blend")
        assert s.validate(nfe).nfe == nfe
        info = s.meta["interpolated"]
        near = min(study, key=lambda k: (abs(k - nfe), -k))
        assert info["decisions_from"] == near
        if 5 < nfe < 10:
            lo, hi = info["between"]
            u = np.linspace(0, 1, len(s.times))
            mine = np.asarray(positions(ns, s.times))
            prof = [np.interp(u, np.linspace(0, 1, len(study[k].times)), positions(ns, study[k].times))
                    for k in (lo, hi)]
            assert np.all(mine >= np.minimum(*prof) - 1e-9) and np.all(mine <= np.maximum(*prof) + 1e-9)
    assert interpolate(study, 6) is study[6]


def test_interpolating_presets_gives_the_preset_at_that_nfe_when_the_neighbours_share_a_spacing():
    ns = noise_mod.get("vp-linear")
    study = {n: presets.build("dpm-solver++-2m", n, ns, lower_order_final=False) for n in (5, 9)}
    s = interpolate(study, 7, method="blend")
    want = presets.build("dpm-solver++-2m", 7, ns, lower_order_final=False)
    assert s.times == pytest.approx(want.times, rel=1e-9)
    assert [dataclasses.replace(st, t=0) for st in s.steps] == [dataclasses.replace(st, t=0) for st in want.steps]


def test_export_at_an_nfe_the_study_did_not_search_is_interpolated_and_says_so(tmp_path, capsys):
    from steptune.cli import main
    from steptune.exports import parse_export
    from steptune.storage import connect

    ns = noise_mod.get("vp-linear")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = connect(url, create=True)
    db.create_study("s", method="s3", problem={"name": "toy", "noise": ns.to_dict(),
                                              "model": {"prediction": "eps", "time_input": "continuous"}})
    db.add_trials("s", [{"schedule": searched(ns, n, n), "status": "complete", "metrics": {"rmse": 1.0 / n},
                         "fidelity": "heldout", "bank": "heldout", "n_samples": 8} for n in (5, 6, 8, 10)])
    ids = {t.nfe: t.id for t in db.best_per_nfe("s")}
    db.close()
    assert main(["export", "--study", "s", "--nfe", "7", "--interpolation", "blend", "--db", url]) == 0
    c = capsys.readouterr()
    sched, prov = parse_export(c.out)
    assert sched.nfe == 7 and prov["status"] == "interpolated" and prov["score"] is None and prov["trial"] is None
    assert prov["interpolated"]["between_trials"] == {"6": ids[6], "8": ids[8]}
    assert prov["interpolated"]["decisions_from_trial"] == ids[8]
    assert "interpolated from NFEs 6, 8" in " ".join(c.err.split())
    assert main(["export", "--study", "s", "--nfe", "7", "--db", url]) == 0
    c = capsys.readouterr()
    sched, prov = parse_export(c.out)
    assert sched.nfe == 7 and prov["interpolated"]["method"] == "split"
    assert "interpolated from NFE 6 (decisions from NFE 6)" in " ".join(c.err.split())
    assert "above the largest searched NFE" not in c.err
    info = prov["interpolated"]
    assert info["between_trials"] == {"6": ids[6]} and info["decisions_from_trial"] == ids[6]
    assert main(["export", "--study", "s", "--nfe", "14", "--db", url]) == 0  # above NFE 10: the blend, and a warning
    c = capsys.readouterr()
    sched, prov = parse_export(c.out)
    assert sched.nfe == 14 and prov["interpolated"]["method"] == "blend"
    assert ("above the largest searched NFE a preset may do better" in " ".join(c.err.split())
            and "or search NFE 14" in " ".join(c.err.split())), c.err


def test_the_absolute_anchor_places_a_shorter_grid_on_the_schedules_own_interval():
    ns = noise_mod.get("vp-linear")
    s = presets.build("dpm-solver++-3m", 8, ns, t_start=1.0, t_end=1e-3)  # orders 1 2 3 3 3 3 2 1
    lam = ns.lam(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    half = float(ns.t_of_lambda(0.5 * (lam[0] + lam[1])))
    times = grid(ns, 4, half, 1e-3)  # the last half in lambda: its steps end where old steps 4, 5, 6, 7 end
    assert [st.order for st in retime(s, times, from_noise=False).steps] == [1, 2, 3, 1]
    assert [st.order for st in retime(s, times, from_noise=False, anchor="absolute").steps] == [1, 2, 2, 1]
    with pytest.raises(ScheduleError, match="anchor 'middle' is unknown"):
        retime(s, times, anchor="middle")


def test_split_keeps_the_searched_schedule_below_whole_and_adds_steps_in_its_widest_intervals():
    ns = noise_mod.get("vp-linear")
    study = {n: searched(ns, n, n) for n in (5, 6, 8, 10)}
    for nfe in (3, 7, 9, 12):
        s = interpolate(study, nfe, method="split")
        assert s.validate(nfe).nfe == nfe
        base = s.meta["interpolated"]["decisions_from"]
        assert base == (max(k for k in study if k < nfe) if nfe > 5 else 5)
        if nfe > base:
            assert set(study[base].times) <= set(s.times)  # every tuned time kept
            lam = ns.lam(torch.tensor(study[base].times, dtype=torch.float64)).numpy()
            widest = int(np.argmax(np.diff(lam)[:-1]))
            mid = 0.5 * (lam[widest] + lam[widest + 1])
            new = sorted(set(s.times) - set(study[base].times), reverse=True)
            assert any(abs(float(ns.lam(t)) - mid) < 1e-9 for t in new)
        else:
            assert set(s.times) <= set(study[base].times)
    with pytest.raises(ScheduleError, match="method 'cubic' is unknown"):
        interpolate(study, 7, method="cubic")


def test_above_the_largest_searched_nfe_the_default_blends_so_the_last_step_shortens_too():
    """Splitting keeps the tuned last step whole at every NFE, which bounds the error however many steps are added;
    above the largest searched NFE the default builds the blend, whose last lambda interval shrinks with the step
    count, and below it the split, as before. Both cost exactly the NFE asked for."""
    ns = noise_mod.get("vp-linear")
    study = {n: searched(ns, n, n) for n in (5, 6)}

    def last_gap(s):
        return float(np.diff(ns.lam(torch.tensor(s.times[-2:], dtype=torch.float64)).numpy())[0])

    tuned = last_gap(study[6])
    for nfe in (7, 12, 30):
        split, auto = interpolate(study, nfe, method="split"), interpolate(study, nfe)
        assert split.validate(nfe).nfe == auto.validate(nfe).nfe == nfe
        assert auto.meta["interpolated"]["method"] == "blend"
        assert last_gap(split) == pytest.approx(tuned, rel=1e-12)
        assert last_gap(auto) < tuned * 8 / nfe  # about the tuned share of the profile, over nfe steps
    assert interpolate(study, 4).meta["interpolated"]["method"] == "split"  # below the searched NFEs: merged
    assert interpolate({5: study[5], 8: searched(ns, 8, 8)}, 7).meta["interpolated"]["method"] == "split"


def test_padding_runs_the_schedule_below_with_short_steps_at_its_end_and_scores_what_it_scores():
    """``pad`` keeps every step of the NFE below but the last, which it splits ``PAD`` of its lambda length before the
    end (again for each further call); on Gaussian data, where the exact ODE solution is known, its error is within
    2% of the schedule below's, one or three model calls more."""
    from gaussian import exact_solution, gaussian_model

    from steptune.space import sample
    from steptune.space.retime import PAD

    ns = noise_mod.get("vp-linear")
    mu, var = torch.tensor([0.5, -1.0, 0.25]), torch.tensor([0.04, 0.25, 1.0])
    model = gaussian_model(ns, mu.double(), var.double())
    base = presets.build("dpm-solver++-3m", 6, ns, t_start=1.0, t_end=1e-3)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_solution(ns, mu.double(), var.double(), x, 1.0, 1e-3)

    def err(s):
        return float((sample(model, x, s) - exact).pow(2).mean().sqrt())

    for nfe in (7, 9):
        s = interpolate({6: base, 10: presets.build("unipc-bh2", 10, ns, t_start=1.0, t_end=1e-3)}, nfe, method="pad")
        assert s.validate(nfe).nfe == nfe and s.meta["interpolated"]["method"] == "pad"
        k = len(base.steps) - 1
        assert s.times[: k + 1] == base.times[: k + 1] and s.steps[:k] == base.steps[:k] and s.times[-1] == 1e-3
        lam = ns.lam(torch.tensor(s.times[k:], dtype=torch.float64)).numpy()
        for j in range(len(lam) - 2):  # each added time PAD of the interval left before the end
            assert lam[-1] - lam[j + 1] == pytest.approx(PAD * (lam[-1] - lam[j]), rel=1e-9)
        assert err(s) == pytest.approx(err(base), rel=0.02)
    with pytest.raises(ScheduleError, match="no.*below|none"):
        interpolate({6: base}, 5, method="pad")


def test_a_schedule_with_implicit_correctors_reaches_every_step_count():
    ns = noise_mod.VPDiscrete.named("sd-scaled-linear")
    s = presets.unipc_bh2(nfe=7, noise=ns)
    s = s.with_steps([dataclasses.replace(st, corrector=dataclasses.replace(st.corrector, kind="implicit"))
                      if st.corrector is not None else st for st in s.steps]).validate()
    assert s.nfe == 13  # a call more for each of the six correctors
    for method in ("split", "auto"):
        for nfe in range(1, 61):
            assert interpolate({13: s}, nfe, method=method).validate(nfe).nfe == nfe
    for nfe in (0, -1, 2.5, True):
        with pytest.raises(ScheduleError, match=f"NFE {nfe!r} is not a number of model calls"):
            interpolate({13: s}, nfe)
