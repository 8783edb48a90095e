"""Refinement of a schedule's continuous parameters by gradient, through the sampler itself.

A searched schedule fixes discrete decisions (orders, predictions, history points, correctors) and
continuous ones. ``refine`` keeps the discrete decisions and tunes

* the times: the interior times between the first and the last time of finite log-SNR, parametrised as
  softmax increments in lambda between those fixed ends (so they stay ordered and inside the range; a final step
  to t = 0, lambda = inf, keeps the time before it), t-basis steps' quadrature weights differentiated with them;
* the start of a schedule that starts later than the problem's ``t_start`` on a discrete VP schedule (diffusers'
  ``leading`` timesteps; the bank's noise is fed to it unchanged): its lambda as a sigmoid between the problem's
  start and the last fitted end, the interior times keeping their shares of the span behind it;
* the DC compensation ratios of every step that can be compensated (in log space, so they stay positive);
* the relaxation coefficient on the first derivative of every step of order 2 or more in the lambda basis and of
  every corrector: the relaxation kind's factor times 1 + coef h (``linear`` is ``none`` with a coefficient);
* the second-derivative scales of the steps of order 3 or more in the lambda basis,

with Adam on the MSE of the final state against the converged reference, on the first ``samples`` states
of the evaluator's train bank but for the ``trim`` share of them whose error is largest at that iteration, in
float32 on the evaluator's device. Every ``check_every`` iterations the
iterate is scored on the held-out bank (the evaluator's own ``evaluate``); a check without a better held-out
RMSE sends the parameters back to the best iterate and halves the learning rates, and the run stops after
``patience`` such checks, returning the best iterate seen. It is kept only if it
beats the parent there: a refinement is never worse on the held-out bank than its parent.

The network's explicit dependence on time is differentiated by autograd where the model says it is
differentiable in its time input (``Model.time_differentiable``: the exact mixture denoisers, the digits UNet),
else by a forward difference (one extra forward pass, no backward, per fitted time and iteration); the dependence
through the state by autograd. So a model need not be differentiable in its time input (plugged networks may
round it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from steptune.space import NonFiniteError, Schedule, ScheduleError, TrajectoryRun, trajectory
from steptune.space.noise import VPDiscrete

from .dc import eligible_steps

Tensor = torch.Tensor
FD_REL = 1e-3  # relative step in t of the forward difference in time
SAMPLES = 128  # default fit states (fewer when the train bank is smaller): the RMSE is dominated by a few hard
#                states, and 64 of them overfit the times of a searched schedule
TRIM = 0.0  # default share of the fit states left out of the loss, those of the largest error at each iteration: a
#             few states that no schedule of the NFE brings near their reference would otherwise set the fit
TRIMS = (0.0, 0.03)  # ``refine_best``'s: each screened with every structure, as which is better depends on the fit
GATE = 0.25  # ``refine_best`` screens a schedule with a trim other than the first only where the two leave out shares
#              of its loss at the start this far apart: fit states with a light tail of errors (digits-cond: 3% of them
#              carry 7-19% of the loss) end alike either way; where a few dominate (gmm-digits: 30-63%) they do not
ITERS = 300  # default iterations, at most: the held-out checks end most runs within 100
STRUCTURES = 8  # default schedules of distinct step structures screened per NFE by ``refine_best``
SCREEN = 40  # iterations of each screened refinement: their held-out ranking after 40 is mostly their final one
LR = {"times": 0.05, "start": 0.05, "dc": 0.03, "relax": 0.05, "corrector": 0.05, "second": 0.05}


class RefineError(ValueError):
    """A schedule or setting that cannot be refined: one sentence saying why."""


@dataclass
class Params:
    """Which continuous parameters of ``schedule`` are fitted, and their tensors."""

    schedule: Schedule  # the parent
    ends: tuple[int, int] | None  # indices of the fixed times bracketing the fitted ones (None: times fixed)
    lam_ends: tuple[float, float] | None
    dc_steps: list[int]
    relax_steps: list[int]
    second_steps: list[int]
    corrector_steps: list[int] = field(default_factory=list)
    theta: dict[str, Tensor] = field(default_factory=dict)
    lam_earliest: float | None = None  # the problem's start lambda, where the start is fitted

    def counts(self) -> dict[str, int]:
        n_times = 0 if self.ends is None else self.ends[1] - self.ends[0] - 1
        return {"times": n_times, **({"start": 1} if "start" in self.theta else {}), "dc_ratio": len(self.dc_steps),
                "relaxation_coef": len(self.relax_steps), "corrector_relaxation_coef": len(self.corrector_steps),
                "second_scale": len(self.second_steps)}

    @property
    def fitted_times(self) -> range:
        """Indices of the times whose value is fitted."""
        if self.ends is None:
            return range(0)
        return range(self.ends[0] + ("start" not in self.theta), self.ends[1])

    # ---- from parameters to what the sampler takes ----

    def times(self, noise) -> Tensor | None:
        if self.ends is None:
            return None
        a, b = self.ends
        lam_a, lam_b = self.lam_ends
        ts = torch.tensor(self.schedule.times, dtype=torch.float64)
        head = ts[: a + 1]
        if "start" in self.theta:
            lam_a = self.lam_earliest + (lam_b - self.lam_earliest) * torch.sigmoid(self.theta["start"][0])
            head = noise.t_of_lambda(lam_a).reshape(1)
        frac = torch.cumsum(torch.softmax(self.theta["times"], 0), 0)[:-1]
        inner = noise.t_of_lambda(lam_a + (lam_b - lam_a) * frac)
        return torch.cat([head, inner, ts[b:]])

    def dc_ratios(self) -> list[float | Tensor] | None:
        if not self.dc_steps:
            return None
        out: list[float | Tensor] = [1.0] * len(self.schedule.steps)
        for j, i in enumerate(self.dc_steps):
            out[i] = self.theta["dc"][j].exp()
        return out

    def step_params(self) -> list[dict] | None:
        if not (self.relax_steps or self.second_steps or self.corrector_steps):
            return None
        out: list[dict] = [{} for _ in self.schedule.steps]
        for j, i in enumerate(self.relax_steps):
            out[i]["relaxation_coef"] = self.theta["relax"][j]
        for j, i in enumerate(self.corrector_steps):
            out[i]["corrector"] = {"relaxation_coef": self.theta["corrector"][j]}
        for j, i in enumerate(self.second_steps):
            out[i]["second_scale"] = self.theta["second"][j]
        return out

    def to_schedule(self, noise) -> Schedule:
        """The schedule these parameters describe (a ScheduleError if they make it invalid)."""
        with torch.no_grad():
            ts = self.times(noise)
            times = self.schedule.times if ts is None else ts.tolist()
            ratios = {i: float(self.theta["dc"][j].exp()) for j, i in enumerate(self.dc_steps)}
            relax = {i: float(self.theta["relax"][j]) for j, i in enumerate(self.relax_steps)}
            second = {i: float(self.theta["second"][j]) for j, i in enumerate(self.second_steps)}
            corr = {i: float(self.theta["corrector"][j]) for j, i in enumerate(self.corrector_steps)}
        steps = []
        for i, st in enumerate(self.schedule.steps):
            changes = {"t": float(times[i + 1])}
            if i in ratios:
                changes["dc_ratio"] = ratios[i]
            if i in relax:
                changes.update(_relaxed(st, relax[i]))
            if i in second:
                changes["second_scale"] = second[i]
            if i in corr:
                changes["corrector"] = replace(st.corrector, **_relaxed(st.corrector, corr[i]))
            steps.append(replace(st, **changes))
        return replace(self.schedule, t_start=float(times[0]), steps=tuple(steps)).validate()


def parameters(schedule: Schedule, noise, *, times: bool = True, dc: bool = True, relax: bool = True,
               second: bool = True, earliest: float | None = None) -> Params:
    """The continuous parameters of ``schedule`` that ``refine`` fits (each kind may be left out). ``earliest``: the
    problem's start, given where a schedule may start later (a discrete VP schedule); a schedule that does is then
    refined in its start too, between ``earliest`` and its last fitted end."""
    steps = list(schedule.steps)
    relax_steps = [i for i, st in enumerate(steps) if relax and st.order >= 2 and st.basis == "lambda"]
    corrector_steps = [i for i, st in enumerate(steps) if relax and st.corrector is not None]
    ends = lam_ends = None
    if times:
        lam = noise.lam(torch.tensor(schedule.times, dtype=torch.float64))
        finite = [k for k, v in enumerate(lam.tolist()) if math.isfinite(v)]
        if finite and finite[-1] - finite[0] >= 2:
            ends = (finite[0], finite[-1])
            lam_ends = (float(lam[ends[0]]), float(lam[ends[1]]))
    p = Params(schedule, ends, lam_ends, eligible_steps(schedule) if dc else [], relax_steps,
               [i for i, st in enumerate(steps) if second and st.order >= 3 and st.basis == "lambda"],
               corrector_steps)
    if ends is not None:
        lam = noise.lam(torch.tensor(schedule.times[ends[0]: ends[1] + 1], dtype=torch.float64))
        p.theta["times"] = torch.log(lam.diff() / (lam[-1] - lam[0]))
        if earliest is not None and ends[0] == 0 and schedule.t_start < earliest:
            p.lam_earliest = float(noise.lam(torch.tensor(float(earliest), dtype=torch.float64)))
            share = (float(lam[0]) - p.lam_earliest) / (float(lam[-1]) - p.lam_earliest)
            p.theta["start"] = torch.tensor([math.log(share / (1 - share))], dtype=torch.float64)
    if p.dc_steps:
        p.theta["dc"] = torch.tensor([math.log(steps[i].dc_ratio) for i in p.dc_steps], dtype=torch.float64)
    if p.relax_steps:
        p.theta["relax"] = torch.tensor([steps[i].relaxation_coef for i in p.relax_steps], dtype=torch.float64)
    if p.corrector_steps:
        p.theta["corrector"] = torch.tensor([steps[i].corrector.relaxation_coef for i in p.corrector_steps],
                                            dtype=torch.float64)
    if p.second_steps:
        p.theta["second"] = torch.tensor([steps[i].second_scale for i in p.second_steps], dtype=torch.float64)
    for v in p.theta.values():
        v.requires_grad_(True)
    return p


def _relaxed(part, coef: float) -> dict:
    """The fields that give ``part`` (a step or a corrector) the relaxation coefficient ``coef``: its kind kept, but
    ``none`` written ``linear`` where the coefficient is not 0, and ``linear`` written ``none`` where it is."""
    kind = part.relaxation
    if kind in ("none", "linear"):
        kind = "linear" if coef != 0.0 else "none"
    return {"relaxation": kind, "relaxation_coef": coef}


def _predict(model, req, count: list[int], fitted: range):
    """The model's (eps, x0) at the request; where its time is being fitted (its index in ``fitted``), with their
    derivative in time in the graph: by autograd through a ``time_differentiable`` model, else by a forward
    difference (value unchanged). ``count[0]`` adds the calls times the samples."""
    t = req.t
    count[0] += req.x.shape[0]
    if not isinstance(t, Tensor):
        return model.predict(req.x, t, req.alpha, req.sigma)
    if req.j in fitted and torch.is_grad_enabled() and model.time_differentiable:
        return model.predict_at(req.x, t, req.alpha, req.sigma)
    tf = float(t.detach())
    eps, x0 = model.predict(req.x, tf, float(req.alpha.detach()), float(req.sigma.detach()))
    if req.j not in fitted or not torch.is_grad_enabled():
        return eps, x0
    noise = model.noise
    t2 = tf * (1.0 - FD_REL)
    count[0] += req.x.shape[0]
    with torch.no_grad():
        e2, x2 = model.predict(req.x.detach(), t2, float(noise.alpha(t2)), float(noise.sigma(t2)))
    shift = (t - tf).to(eps.dtype)  # 0 in value, 1 in gradient
    return eps + shift * ((e2 - eps.detach()) / (t2 - tf)), x0 + shift * ((x2 - x0.detach()) / (t2 - tf))


def final_state(model, p: Params, x_T: Tensor, count: list[int] | None = None,
                constant: dict | None = None) -> Tensor:
    """The sampler's final state from ``x_T`` as a differentiable function of ``p``'s parameters (``count``: see
    ``_predict``). ``constant``, where given, keeps the model's outputs at ``x_T`` and a time not fitted (the first
    call, where the start is fixed), which no parameter moves, for later calls from the same ``x_T``."""
    count = [0] if count is None else count
    fitted = p.fitted_times
    loop = TrajectoryRun(trajectory(p.schedule, model.noise, x_T, model.data_mean, dc_ratios=p.dc_ratios(),
                                    times=p.times(model.noise), step_params=p.step_params(), reuse_buffers=False))
    while not loop.done:
        req = loop.request
        if constant is None or req.x is not x_T or req.j in fitted:
            loop.send(_predict(model, req, count, fitted))
            continue
        key = (req.j, float(req.t.detach() if isinstance(req.t, Tensor) else req.t))
        if key not in constant:
            constant[key] = _predict(model, req, count, fitted)
        loop.send(constant[key])
    return loop.result


@dataclass
class RefineResult:
    """The outcome of ``refine``. ``schedule`` is what to keep: the best iterate when ``improved``, else the
    parent; ``candidate`` is the best iterate on the held-out bank either way."""

    parent: Schedule
    schedule: Schedule
    candidate: Schedule
    parent_rmse: float  # held-out
    candidate_rmse: float
    candidate_result: object  # the candidate's held-out EvalResult
    improved: bool
    loss_start: float  # train-bank MSE of the final state, parent (but for the ``dropped`` states of largest error)
    loss: float  # the same, candidate
    iters: int  # iterations run
    best_iter: int
    seconds: float
    model_calls: int  # the model calls times the samples: the fit's (with its forward differences) and the checks'
    fitted: dict[str, int]
    samples: int
    history: list[dict] = field(default_factory=list)
    stopped: bool = False  # ``stop`` ended it before its own end
    out_of_time: bool = False  # its ``seconds`` ran out before its own end (the best iterate so far is the result)
    dropped: int = 0  # fit states left out of each iteration's loss (``trim``)

    @property
    def rmse(self) -> float:
        return self.candidate_rmse if self.improved else self.parent_rmse

    def info(self) -> dict:
        """What a stored trial records of this refinement (JSON: a loss never computed is None)."""
        def finite(v):
            return v if v is not None and math.isfinite(v) else None

        return {"improved": self.improved, "parent_rmse": finite(self.parent_rmse),
                "candidate_rmse": finite(self.candidate_rmse), "loss_start": finite(self.loss_start),
                "loss": finite(self.loss), "iters": self.iters, "best_iter": self.best_iter,
                "seconds": self.seconds, "model_calls": self.model_calls, "fitted": self.fitted,
                "samples": self.samples, "dropped": self.dropped, **({"out_of_time": True} if self.out_of_time else {})}


class Refinement:
    """One refinement in progress (``refine`` runs one to its end): ``advance(until)`` runs its iterations up to
    ``until``, and it may be advanced again later from exactly where it stopped (its Adam state, step sizes and
    best iterate kept), so a refinement run in parts is the same as one run whole. ``result()`` is the outcome so
    far. See ``refine`` for the arguments."""

    def __init__(self, evaluator, schedule: Schedule, *, iters: int = ITERS, samples: int | None = None,
                 trim: float = TRIM, check_every: int = 10, patience: int = 4, lr: float | dict | None = None,
                 times: bool = True, dc: bool = True, relax: bool = True, second: bool = True,
                 progress: Callable[[int, int, float], None] | None = None, stop: Callable[[], bool] | None = None,
                 parent=None, deadline: float | None = None):
        if iters < 1:
            raise RefineError(f"iters must be at least 1, not {iters}")
        if check_every < 1 or patience < 1:
            raise RefineError("check_every and patience must be at least 1")
        bank = evaluator.bank("train")
        samples = min(SAMPLES, bank.size) if samples is None else samples
        if not 1 <= samples <= bank.size:
            raise RefineError(f"samples = {samples} is outside the train bank (1 .. {bank.size}); use fewer samples")
        try:
            evaluator.check(schedule)
        except ScheduleError as e:
            raise RefineError(str(e)) from None
        start = time.perf_counter()
        self.evaluator, self.schedule, self.iters, self.samples = evaluator, schedule, iters, samples
        self.dropped = dropped(trim, samples)  # states left out of each iteration's loss
        self.check_every, self.patience, self.progress, self.stop = check_every, patience, progress, stop
        problem = evaluator.problem
        self.model, self.noise = problem.model, problem.noise
        self.rates = dict(LR)
        if isinstance(lr, dict):
            self.rates.update(lr)
        elif lr is not None:
            self.rates = {k: v * float(lr) for k, v in self.rates.items()}
        late = isinstance(self.noise, VPDiscrete) and schedule.t_start < problem.t_start
        self.p = parameters(schedule, self.noise, times=times, dc=dc, relax=relax, second=second,
                            earliest=problem.t_start if late else None)
        self.x_T = evaluator.x_T("train", samples).to(torch.float32)
        self.ref = evaluator.reference("train", schedule.steps[-1].t)[:samples].to(torch.float32)
        self.count = [0]
        self.constant: dict = {}  # the model's outputs at x_T where no parameter moves them
        self.stopped = self.out_of_time = False
        self.deadline = deadline  # time.perf_counter() at which it ends wherever it is (None: never)
        self.history: list[dict] = []
        self.loss_start = math.nan
        self.iters_run = 0
        self.scale, self.stale = 1.0, 0
        self.kept = {k: v.detach().clone() for k, v in self.p.theta.items()}
        self.opt = self._adam() if self.p.theta else None
        self.done = not self.p.theta  # nothing more to run: no parameters, the iterations or the patience spent
        if parent is None:
            with self.model.uncounted():
                parent_rmse, parent_result = self._heldout(schedule)
        else:
            heldout = evaluator.bank("heldout").size
            if (parent.bank, parent.n, parent.nfe) != ("heldout", heldout, schedule.nfe):
                raise RefineError(f"the parent's evaluation given is of {parent.n} states of the {parent.bank!r} bank "
                                  f"at NFE {parent.nfe}, not of the whole held-out bank ({heldout}) at NFE "
                                  f"{schedule.nfe}; leave it out to evaluate the parent here")
            parent_rmse, parent_result = (parent.metrics["rmse"] if parent.ok else math.inf), parent
        self.parent_rmse, self.parent_result = parent_rmse, parent_result
        self.best = (parent_rmse, schedule, 0, parent_result)  # held-out RMSE, schedule, iteration, EvalResult
        self.seconds = time.perf_counter() - start

    @property
    def rmse(self) -> float:
        """The best held-out RMSE so far (the parent's until an iterate beats it)."""
        return self.best[0]

    def _adam(self):
        return torch.optim.Adam([{"params": [v], "lr": self.rates[k] * self.scale} for k, v in self.p.theta.items()])

    def _loss(self, state: Tensor) -> Tensor:
        """The mean squared error of the final states but for the ``dropped`` states of the largest error."""
        sq = (state - self.ref).pow(2)
        if not self.dropped:  # the plain mean, with no sort at every iteration
            return sq.mean()
        return sq.flatten(1).mean(1).sort().values[:-self.dropped].mean()

    def _heldout(self, s: Schedule):
        r = self.evaluator.evaluate(s, "heldout")
        self.count[0] += r.model_calls or 0
        return (r.metrics["rmse"] if r.ok else math.inf), r

    def advance(self, until: int | None = None) -> Refinement:
        """Run the iterations up to ``until`` (default: all of them), or fewer where it ends before."""
        until = self.iters if until is None else min(until, self.iters)
        start = time.perf_counter()
        p = self.p
        with self.model.uncounted():
            for it in range(self.iters_run + 1, until + 1):
                if self.done:
                    break
                if self.stop is not None and self.stop():
                    self.stopped = self.done = True
                    break
                if _past(self.deadline):
                    self.out_of_time = self.done = True
                    break
                try:
                    loss = self._loss(final_state(self.model, p, self.x_T, self.count, self.constant))
                except NonFiniteError:
                    self.done = True
                    break
                value = float(loss.detach())
                if it == 1:
                    self.loss_start = value
                self.opt.zero_grad()
                loss.backward()
                if not all(torch.isfinite(v.grad).all() for v in p.theta.values() if v.grad is not None):
                    self.done = True
                    break
                self.opt.step()
                self.iters_run = it
                self.history.append({"iter": it, "loss": value})
                if it == self.iters:
                    self.done = True
                elif it % self.check_every:
                    continue
                try:
                    cand = p.to_schedule(self.noise)
                    r, res = self._heldout(cand)
                except ScheduleError:
                    r = math.inf
                self.history[-1]["heldout_rmse"] = r
                if r < self.best[0]:
                    self.best = (r, cand, it, res)
                    self.kept = {k: v.detach().clone() for k, v in p.theta.items()}
                else:  # back to the best iterate, with half the steps
                    self.stale += 1
                    self.scale /= 2
                    with torch.no_grad():
                        for k, v in p.theta.items():
                            v.copy_(self.kept[k])
                    self.opt = self._adam()
                if self.progress is not None:
                    self.progress(it, self.iters, self.best[0])
                if self.stale >= self.patience:
                    self.done = True
        self.seconds += time.perf_counter() - start
        return self

    def result(self) -> RefineResult:
        """The outcome so far (its train-bank loss of the best iterate is computed here)."""
        start = time.perf_counter()
        cand_rmse, cand, best_iter, cand_result = self.best
        schedule = self.schedule
        if math.isnan(self.loss_start) or cand is schedule:
            loss_best = self.loss_start
        else:
            with self.model.uncounted(), torch.no_grad():
                state = final_state(self.model, parameters(cand, self.noise), self.x_T, self.count, self.constant)
                loss_best = float(self._loss(state))
        self.seconds += time.perf_counter() - start
        improved = cand_rmse < self.parent_rmse
        return RefineResult(schedule, cand if improved else schedule, cand, self.parent_rmse, cand_rmse, cand_result,
                            improved, self.loss_start, loss_best, self.iters_run, best_iter, self.seconds,
                            self.count[0], self.p.counts(), self.samples, list(self.history), self.stopped,
                            self.out_of_time, self.dropped)


def refine(evaluator, schedule: Schedule, *, iters: int = ITERS, samples: int | None = None, trim: float = TRIM,
           check_every: int = 10, patience: int = 4, lr: float | dict | None = None, times: bool = True,
           dc: bool = True, relax: bool = True, second: bool = True,
           progress: Callable[[int, int, float], None] | None = None, stop: Callable[[], bool] | None = None,
           parent=None, seconds: float | None = None) -> RefineResult:
    """Refine ``schedule``'s continuous parameters on ``evaluator`` (see the module docstring). ``lr`` scales
    (a number) or replaces (a dict by kind: times, start, dc, relax, corrector, second) the default learning rates;
    ``progress(iteration, iters, held-out RMSE of the best iterate so far)`` is called after each check;
    ``samples`` defaults to ``SAMPLES`` or the whole train bank when it is smaller; ``trim``: the share of them,
    those of the largest error at each iteration, left out of the loss (rounded to a number of states); ``stop()``
    true ends it before the next iteration (``stopped``); ``parent``: the schedule's ``EvalResult`` on the whole
    held-out bank, where it was evaluated there before (it is then not evaluated again); ``seconds``: it ends after
    about this long (``out_of_time``; an iteration and its check run to their end), the best iterate on the held-out
    bank so far its result."""
    deadline = _deadline(seconds, time.perf_counter())
    return Refinement(evaluator, schedule, iters=iters, samples=samples, trim=trim, check_every=check_every,
                      patience=patience, lr=lr, times=times, dc=dc, relax=relax, second=second, progress=progress,
                      stop=stop, parent=parent, deadline=deadline).advance().result()


def as_trims(trim: float | Sequence[float]) -> list[float]:
    """``trim`` as a list of shares (one share, or several)."""
    return [trim] if isinstance(trim, int | float) else list(trim)


def dropped(trim: float, samples: int) -> int:
    """The fit states a ``trim`` leaves out of the loss of ``samples``: round(trim x samples), one state always
    fitted."""
    if not 0 <= trim < 1:
        raise RefineError(f"trim = {trim} is not a share of the fit states (0 to below 1)")
    return min(round(trim * samples), samples - 1)


def loss_shares(evaluator, schedule: Schedule, trims: Sequence[float], samples: int,
                count: list[int] | None = None) -> list[float]:
    """For each of ``trims``, the share of ``schedule``'s loss on its first ``samples`` fit states (as ``refine``
    fits it, before any iteration) carried by the states that trim leaves out; all 0 where it does not run."""
    model, noise = evaluator.problem.model, evaluator.problem.noise
    x_T = evaluator.x_T("train", samples).to(torch.float32)
    ref = evaluator.reference("train", schedule.steps[-1].t)[:samples].to(torch.float32)
    try:
        with model.uncounted(), torch.no_grad():
            state = final_state(model, parameters(schedule, noise), x_T, count)
    except (NonFiniteError, ScheduleError):
        return [0.0] * len(trims)
    err = (state - ref).pow(2).flatten(1).mean(1).sort(descending=True).values
    total = float(err.sum())
    if not (math.isfinite(total) and total > 0):
        return [0.0] * len(trims)
    return [float(err[: dropped(t, samples)].sum()) / total for t in trims]


def _deadline(seconds: float | None, start: float) -> float | None:
    """The ``time.perf_counter()`` at which a refinement of ``seconds`` begun at ``start`` ends (None: no limit)."""
    if seconds is None:
        return None
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise RefineError(f"seconds = {seconds!r}: give the time a refinement may take as a number above 0")
    return start + float(seconds)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def refined_structure(schedule: Schedule, noise) -> str:
    """What refinement cannot change in ``schedule``: its structure key with every parameter ``refine`` fits set to
    a fixed value (so schedules that differ only in DC ratios, relaxation coefficients or second-derivative scales
    share it, as they share their times' key)."""
    p = parameters(schedule, noise)
    steps = list(p.schedule.steps)
    for i in p.dc_steps:
        steps[i] = replace(steps[i], dc_ratio=1.0)
    for i in p.relax_steps:
        steps[i] = replace(steps[i], **_relaxed(steps[i], 0.0))
    for i in p.corrector_steps:
        steps[i] = replace(steps[i], corrector=replace(steps[i].corrector, **_relaxed(steps[i].corrector, 0.0)))
    for i in p.second_steps:
        steps[i] = replace(steps[i], second_scale=1.0)
    return p.schedule.with_steps(steps).structure_key()


def screen_length(iters: int, check_every: int = 10) -> int:
    """The iterations of each screening ahead of refinements of at most ``iters``: ``SCREEN``, or fewer whole
    check intervals where ``iters`` is smaller (0: too few iterations to screen)."""
    return min(SCREEN, (iters - 1) // check_every * check_every)


@dataclass
class Screened:
    """``refine_best``'s outcome: ``result`` refines ``schedules[winner]`` (its ``parent``) with the trim
    ``trims[chosen]``; ``screened`` holds, for each schedule and trim screened (``entries``: their indices into the
    schedules and the trims, every schedule with the first trim first), the held-out RMSE before and after its
    screening refinement and that refinement's iterations."""

    winner: int
    result: RefineResult
    screened: list[tuple[float, float, int]]
    entries: list[tuple[int, int]] = field(default_factory=list)
    chosen: int = 0


def screen_rounds(screen: int, check_every: int = 10, field: int = 2) -> list[int]:
    """The iterations at which a screening of ``screen`` iterations over ``field`` schedules halves its field, until
    one is left (successive halving): each round ends at twice the iterations of the one before, the last at
    ``screen``, every one on a held-out check (whole check intervals, at least one). A field of 8 and a screening of
    40 give [10, 20, 40]: 8 run 10 iterations, 4 to 20, 2 to 40."""
    rounds = [screen]
    while len(rounds) < math.ceil(math.log2(max(field, 2))):
        nxt = rounds[0] // 2 // check_every * check_every
        if nxt < check_every or nxt == rounds[0]:
            break
        rounds.insert(0, nxt)
    return rounds


def refine_best(evaluator, schedules: list[Schedule], *, screen: int = SCREEN, iters: int = ITERS,
                halving: bool = True, progress: Callable[[int, int, float], None] | None = None,
                stop: Callable[[], bool] | None = None, parents: list | None = None, seconds: float | None = None,
                trim: float | Sequence[float] = TRIMS, gate: float = GATE,
                plan: Callable[[list[tuple[int, int]], list[int]], None] | None = None, **options) -> Screened:
    """Refine the most promising of ``schedules`` (one NFE's schedules of different discrete structures), each with
    each ``trim`` (a share of the fit states left out of the loss, or several: one that helps a fit can hurt
    another's), by a screening: every pair is refined for the first of ``screen_rounds``' iterations, the better half
    of them on the held-out bank (at their last check) to the next, and so on until one is left at ``screen``
    (``halving``; else all run ``screen``); that one then goes on to the end from where it was (its Adam state and
    step sizes kept: its result is ``refine``'s of that schedule and trim). How far a structure gets by refinement
    is not what it scores before: the search's best is often not the best refined. One pair is refined as ``refine``
    does (no screening); with ``screen`` 0, every pair is, and the best at its end is the result. ``options`` are
    ``refine``'s; ``progress`` counts the iterations of all the refinements; ``parents``: each schedule's held-out
    ``EvalResult`` where made before (or None), as ``refine``'s ``parent``; ``seconds``: all of it ends after about
    this long, the screening included (no pair starts its screening after it, those screened so far compete, and the
    winner's best iterate so far is the result). A trim other than the first is screened with a schedule only where
    the shares of its loss the two leave out (``loss_shares``) are at least ``gate`` apart (0: always); their model
    calls count in the result's. ``plan(entries, rounds)`` is told the pairs screened and the rounds before they
    run."""
    if not schedules:
        raise RefineError("no schedule to refine")
    trims = as_trims(trim)
    if not trims:
        raise RefineError("no trim to refine with: give at least one share of the fit states, e.g. 0")
    for t in trims:
        dropped(t, 2)  # refused here, before any refinement runs
    parents = [None] * len(schedules) if parents is None else list(parents)
    if len(parents) != len(schedules):
        raise RefineError(f"{len(parents)} parent evaluations for {len(schedules)} schedules")
    bank, count = evaluator.bank("train").size, [0]
    samples = options.get("samples") or min(SAMPLES, bank)
    screens = [[True] * len(trims) for _ in schedules]
    if len(trims) > 1 and gate > 0 and 1 <= samples <= bank:  # else Refinement refuses the samples
        for i, s in enumerate(schedules):
            shares = loss_shares(evaluator, s, trims, samples, count)
            screens[i] = [k == 0 or abs(v - shares[0]) >= gate for k, v in enumerate(shares)]
    entries = [(i, k) for k in range(len(trims)) for i in range(len(schedules)) if screens[i][k]]
    check = options.get("check_every", 10)
    if len(entries) > 1 and screen and (not 1 <= screen < iters or screen % check):
        raise RefineError(f"the screening's iterations ({screen}) must be a multiple of check_every ({check}), so that "
                          f"each screening ends on a held-out check, and fewer than iters ({iters})")
    start = time.perf_counter()
    deadline = _deadline(seconds, start)
    rounds = [] if len(entries) == 1 or not screen else (
        screen_rounds(screen, check, len(entries)) if halving else [screen])
    left, total = len(entries), iters - rounds[-1] if rounds else iters * len(entries)
    for a, b in zip([0, *rounds], rounds):
        total, left = total + left * (b - a), -(-left // 2)
    ran = [0]
    if plan is not None:
        plan(entries, rounds)

    def reporter(run_start: int):
        base = ran[0] - run_start
        return lambda it, _n, best: None if progress is None else progress(base + it, total, best)

    runs: list[Refinement] = []
    screened: list[tuple[float, float, int]] = []
    alive = list(range(len(entries)))
    for k, until in enumerate([*rounds, None]):  # the last: the one left goes on to its end
        for e in alive:
            if e == len(runs):
                if runs and _past(deadline):
                    break  # out of time: the rest are not screened
                i, j = entries[e]
                runs.append(Refinement(evaluator, schedules[i], iters=iters, stop=stop, parent=parents[i],
                                       deadline=deadline, trim=trims[j], **options))
                parents[i] = runs[-1].parent_result  # not evaluated again with the next trim
            r = runs[e]
            r.progress, before = reporter(r.iters_run), r.iters_run
            r.advance(until)
            ran[0] += r.iters_run - before
            if r.stopped:
                return Screened(entries[e][0], replace(r.result(), seconds=time.perf_counter() - start), [])
        alive = sorted((e for e in alive if e < len(runs)), key=lambda e: (runs[e].rmse, e))
        alive = alive[:1] if k >= len(rounds) - 1 else alive[: -(-len(alive) // 2)]
        if k == len(rounds) - 1:
            screened = [(r.parent_rmse, r.rmse, r.iters_run) for r in runs]
    (w,) = alive
    results = [r.result() for r in runs]
    result = replace(results[w], seconds=time.perf_counter() - start,
                     model_calls=count[0] + sum(r.model_calls for r in results))
    return Screened(entries[w][0], result, screened, entries[: len(screened)], entries[w][1])
