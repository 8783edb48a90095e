"""Sample grids of image problems: the PNG's images are the decoded samples and reference pixel for pixel, the
errors under them are the evaluator's metrics, the best preset is the lowest on the train bank; `steptune eval
--grid` with a plugged network's decode, and one sentence where a problem has no images."""

import io
import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from gaussian import eps_fn

from steptune import grids
from steptune.cli import main
from steptune.evaluators import Evaluator, Plug, load_problem
from steptune.evaluators.digits_cond import digits_problem
from steptune.search import DEFAULT_PRESETS
from steptune.space import ScheduleError, presets, sample
from steptune.space import noise as noise_mod
from steptune.space import spacing as spacing_mod

NS = noise_mod.VPLinear()
MU = torch.tensor([0.5, -1.0, 0.25, 1.5])
VAR = torch.tensor([0.04, 0.25, 1.0, 0.09])


def image_factory():
    """A 4-value Gaussian network whose states are shown as 2 x 2 grey images."""
    return Plug(network=eps_fn(NS, MU, VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous", decode=lambda x: ((x.reshape(-1, 1, 2, 2) + 2) / 4).clamp(0, 1))


def flat_decode_factory():
    """A decode that returns the states as they are (not images)."""
    return Plug(network=eps_fn(NS, MU, VAR), shape=(4,), noise="vp-linear", prediction="eps",
                time_input="continuous", decode=lambda x: x)


def _png(data: bytes) -> np.ndarray:
    """The PNG as uint8 RGB, read back by matplotlib (not by the code that wrote it)."""
    return np.round(mpimg.imread(io.BytesIO(data), format="png")[..., :3] * 255).astype(np.uint8)


def _expected_pixels(images: torch.Tensor) -> np.ndarray:
    """(n, H, W) uint8 of grey images in [0, 1]."""
    return np.round(images[:, 0].double().clamp(0, 1).numpy() * 255).astype(np.uint8)


def _cell(png: np.ndarray, layout, row: int, column: int) -> np.ndarray:
    """The image in a cell, shrunk back to its own pixels; every pixel must be a uniform grey block."""
    top, left, bottom, right = layout.box(row, column)
    cell = png[top:bottom, left:right]
    s = layout.scale
    assert cell.shape[:2] == (layout.height * s, layout.width * s)
    small = cell[::s, ::s]
    assert np.array_equal(cell, np.kron(small, np.ones((s, s, 1), np.uint8)))  # nearest neighbour, no blur
    assert np.array_equal(small[..., 0], small[..., 1]) and np.array_equal(small[..., 0], small[..., 2])
    return small[..., 0]


@pytest.fixture(scope="module")
def digits():
    prob = digits_problem(guidance_scale=3.0, models_dir=None)
    sched = presets.build("unipc-bh2", 5, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
    # a best preset that ends at t = 0: its errors are against the reference at t = 0, as the evaluator's
    best = presets.build("ddim", 5, prob.noise, spacing="diffusers-trailing", t_start=prob.t_start, t_end=prob.t_end)
    assert best.steps[-1].t == 0.0 and sched.steps[-1].t == prob.t_end > 0
    grid = grids.build_grid(grids.grid_evaluator(prob, None), sched, ("ddim:spacing=diffusers-trailing", best),
                            "preset:unipc-bh2")
    # the evaluator a user gets, built apart from the grid's (its own reference solve)
    ev = Evaluator(digits_problem(guidance_scale=3.0, models_dir=None, quality=False), n_train=16,
                   n_heldout=grids.ROWS, cache_dir=None)  # (no FD: it needs more than one sample)
    return grid, ev, sched, best


def test_the_reference_and_sample_columns_are_the_decoded_states_pixel_for_pixel(digits):
    grid, ev, sched, best = digits
    png, layout = _png(grid.png()), grid.layout()
    assert png.shape[:2] == layout.size
    assert [c.role for c in grid.columns] == ["schedule", "best preset", "reference"]
    decode = ev.problem.decode
    x_T = ev.x_T("heldout")
    with torch.no_grad():
        expected = [_expected_pixels(decode(sample(ev.problem.model, x_T, s))) for s in (sched, best)]
    expected.append(_expected_pixels(decode(ev.reference("heldout"))))
    for column, want in enumerate(expected):
        for row in range(grids.ROWS):
            assert np.array_equal(_cell(png, layout, row, column), want[row]), (row, column)
    assert not np.array_equal(expected[0], expected[2])  # five steps do not reach the reference


def test_the_errors_under_the_samples_are_the_evaluators_metrics(digits):
    grid, ev, sched, best = digits
    for column, s in zip(grid.columns[:2], (sched, best)):
        e = np.array(column.errors)
        res = ev.evaluate(s, "heldout")
        assert float(np.sqrt((e ** 2).mean())) == pytest.approx(res.metrics["rmse"], rel=1e-9)
        assert float(np.sort(e)[(len(e) - 1) // 2]) == pytest.approx(res.metrics["median_err"], rel=1e-9)
        # sample 0 alone: its error is the RMSE of a one-sample evaluation (float32 network, another batch size)
        assert e[0] == pytest.approx(ev.evaluate(s, "heldout", n=1).metrics["rmse"], rel=1e-5)
    assert grid.columns[2].errors == [0.0] * grids.ROWS
    assert grid.to_dict()["columns"][0]["errors"] == grid.columns[0].errors


def test_the_best_default_preset_is_the_lowest_train_rmse_over_presets_and_spacings(digits):
    _, ev, _, _ = digits
    name, sched = grids.best_default_preset(ev, 5)
    prob = ev.problem
    scores = {}
    for p in DEFAULT_PRESETS:
        for sp in spacing_mod.candidates(prob.noise):
            try:
                s = presets.build(p, 5, prob.noise, spacing=sp, t_start=prob.t_start, t_end=prob.t_end)
            except ScheduleError:
                continue
            if s.nfe == 5:
                scores[(p, sp)] = ev.evaluate(s, "train").metrics["rmse"]
    assert len({p for p, _ in scores}) >= 10 and len({sp for _, sp in scores}) == 6
    best = min(scores.values())
    assert ev.evaluate(sched, "train").metrics["rmse"] == pytest.approx(best, rel=1e-9)
    p, sp = min(scores, key=scores.get)
    assert sched.nfe == 5 and name.startswith(p) and name.endswith(f"spacing={sp}")


def test_eval_grid_writes_the_plugged_networks_decoded_samples(tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["eval", "--model", "test_grids:image_factory", "--schedule", "preset:ddim", "--nfe", "4", "--json",
               "--grid", str(out), "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    meta = json.loads(captured.out)["grid"]
    assert meta["path"] == str(out) and meta["rows"] == grids.ROWS
    assert [c["role"] for c in meta["columns"]] == ["schedule", "best preset", "reference"]
    prob = load_problem("test_grids:image_factory")
    ev = Evaluator(prob, n_train=64, n_heldout=grids.ROWS, cache_dir=None)
    ref = ev.reference("heldout")
    want = _expected_pixels(prob.decode(ref))
    png = _png(out.read_bytes())
    layout = grids.Layout(rows=grids.ROWS, columns=3, height=2, width=2)
    assert png.shape[:2] == layout.size
    for row in range(grids.ROWS):
        assert np.array_equal(_cell(png, layout, row, 2), want[row])
    ddim = presets.build("ddim", 4, NS, t_start=prob.t_start, t_end=prob.t_end)
    assert meta["columns"][0]["errors"] == pytest.approx(grids.per_sample_errors(
        sample(prob.model, ev.x_T("heldout"), ddim), ref), rel=1e-6)
    assert meta["columns"][1]["name"].partition(":")[0] in DEFAULT_PRESETS


def test_a_stored_identity_builds_the_same_image_problem_again():
    for prob in (load_problem("test_grids:image_factory"), digits_problem(guidance_scale=5.0, quality=False)):
        identity = json.loads(json.dumps(prob.identity()))  # as the database gives it back
        assert grids.is_image_identity(identity)
        again = grids.stored_problem(identity)
        assert again.identity() == prob.identity() and again.decode is not None
    other = json.loads(json.dumps(digits_problem(guidance_scale=5.0, quality=False).identity()))
    other["data"]["unet_sha256"] = "0" * 64
    with pytest.raises(grids.GridError, match="not the one the study ran"):
        grids.stored_problem(other)
    plain = json.loads(json.dumps(load_problem("gmm-2d").identity()))
    assert not grids.is_image_identity(plain)
    with pytest.raises(grids.GridError, match="has no images to show"):
        grids.stored_problem(plain)


@pytest.mark.parametrize("args, words", [
    (["--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "4"], ["--grid", "'gmm-2d' has no images",
                                                                          "decode(x)"]),
    (["--problem", "gmm-2d", "--schedule", "preset:ddim", "--nfe", "4,5"], ["--grid draws one schedule at one NFE"]),
    (["--model", "test_grids:flat_decode_factory", "--schedule", "preset:ddim", "--nfe", "4"],
     ["--grid", "decode returned shape (8, 4)", "(n, 1 or 3, H, W)"]),
    (["--problem", "gmm-2d", "--schedule", "preset:ddim", "--schedule", "preset:heun", "--nfe", "4"],
     ["--grid draws one schedule at one NFE"]),
])
def test_eval_grid_says_in_one_sentence_when_it_cannot_draw(tmp_path, capsys, args, words):
    out = tmp_path / "grid.png"
    rc = main(["eval", *args, "--grid", str(out), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_the_dashboards_best_preset_is_named_with_the_spacing_it_was_scored_at(tmp_path):
    """The front has one curve per preset, the best of its spacings; the grid's column names the stored schedule
    that is best, spacing included, as the search's table does."""
    from dataclasses import replace

    from steptune.dashboard.grid_view import best_stored_preset
    from steptune.evaluators.problems import get_problem
    from steptune.storage import connect

    prob = get_problem("gmm-2d")
    items = []
    for sp, score in (("logsnr", 0.2), ("time-uniform", 0.1)):
        s = presets.build("ddim", 5, prob.noise, spacing=sp, t_start=prob.t_start, t_end=prob.t_end)
        items.append({"schedule": replace(s, name=f"ddim:spacing={sp}"), "status": "complete", "score": score,
                      "metrics": {"rmse": score}, "fidelity": "heldout", "bank": "heldout",
                      "info": {"baseline": True, "origin": f"preset:ddim@5 spacing={sp}"}})
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as store:
        ids = store.add_trials("s", items, create={"method": "s3", "problem": prob.identity(), "metric": "rmse"})
        name, schedule, trial = best_stored_preset(store, "s", 5, "heldout")
    assert (name, trial, schedule.name) == ("ddim:spacing=time-uniform", ids[1], "ddim:spacing=time-uniform")


def test_a_long_schedule_name_stays_within_its_column():
    """A refined schedule's name grows with every neighbour it was built from (dpm-solver++-2s+afs@7@6@7@6@7): each
    title line is cut to its column, so no name runs off the image or into the next column's."""
    names = ["dpm-solver++-2s+afs@7@6@7@6@7@6@7@6@7", "preset:unipc-bh2:spacing=diffusers-leading,order=3,corrector=x"]
    cols = [grids.Column("schedule", names[0], None, [0.1] * grids.ROWS),
            grids.Column("best preset", names[1], None, [0.1] * grids.ROWS),
            grids.Column("reference", "reference", None, [0.0] * grids.ROWS)]
    grid = grids.Grid("digits-cond", 7, cols, pixels=[np.zeros((grids.ROWS, 8, 8, 3), np.uint8)] * 3)
    png, lay = _png(grid.png()), grid.layout()
    titles = png[16:grids.HEADER - 4]  # the name lines under the bold column titles
    assert (titles < 200).any(axis=(1, 2)).sum() > 10  # the names are drawn
    between = [grids.PAD + k * (lay.column_width + grids.GAP) - grids.GAP // 2 for k in (1, 2)]
    for x in [0, 1, 2, png.shape[1] - 3, png.shape[1] - 2, png.shape[1] - 1, *between]:
        assert (titles[:, x] == 255).all(), x  # white: no text reaches the edges or the middle of a gap
