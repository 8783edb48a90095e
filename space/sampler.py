"""The one sampler loop: runs any valid Schedule on a Model, batched over samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from . import noise as noise_mod
from .errors import ScheduleError
from .kernel import Node, Point, StepRule, lagrange_weights, solve_step
from .model import Model
from .noise import NoiseSchedule
from .schedule import Schedule, Step

Tensor = torch.Tensor


class NonFiniteError(RuntimeError):
    """The sampler produced NaN or inf; ``step`` is the index of the step where it happened."""

    def __init__(self, step: int, where: str):
        super().__init__(f"step {step}: non-finite values in the {where}; the schedule diverged here")
        self.step = step
        self.where = where


def _check(x: Tensor, step: int, where: str) -> None:
    # one cheap reduction first: any NaN or inf makes the sum non-finite (a huge finite sum may overflow too,
    # so confirm element-wise before failing)
    if not math.isfinite(float(x.detach().sum())) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(step, where)


class _StateChecks:
    """Whether the state is finite after each step. On the CPU each check is immediate (a diverging run
    stops there). On an accelerator the checks are queued on the device and read once, at the end: reading
    a device value waits for the device, and a wait per step would keep the host from queueing the next
    work while the device runs (for K batched runs, K waits per network call)."""

    def __init__(self, device: torch.device):
        self.deferred = device.type != "cpu"
        self.flags: list[Tensor] = []

    def after_step(self, x: Tensor, step: int) -> None:
        if self.deferred:
            self.flags.append(torch.isfinite(x.detach()).all())
        else:
            _check(x, step, "state")

    def finish(self) -> None:
        if self.flags:
            ok = torch.stack(self.flags).cpu()
            if not bool(ok.all()):
                raise NonFiniteError(int((~ok).nonzero()[0]), "state")


def _afs_outputs(data_mean: Tensor | None, x: Tensor, alpha: float, sigma: float, afs: str) -> tuple[Tensor, Tensor]:
    if afs == "zero":
        x0 = torch.zeros_like(x)
    else:
        if data_mean is None:
            raise ScheduleError("schedule: field 'afs' is 'mean' but the model has no data_mean; use 'zero' or set it")
        x0 = data_mean.to(x).expand_as(x)
    return (x - alpha * x0) / sigma, x0


def _compensate(hist: list[Point], ratio: float | Tensor) -> None:
    """DC-Solver: replace the newest outputs by their Lagrange interpolation (in t) over the last
    three points at tau = t_-2 + ratio (t_-1 - t_-2). ``ratio`` may be a 0-d tensor (fitting it by
    backpropagation); every buffered output that the following steps use is then a function of it."""
    pts = hist[-3:]
    # in u = (t - t_-2) / (t_-1 - t_-2) (an affine map, so the same polynomial): t_-2 -> 0, t_-1 -> 1 and
    # tau -> ratio exactly, so a ratio of exactly 1 gives the weights (0, 0, 1) exactly
    t2, t1 = pts[-2].t, pts[-1].t
    lw = lagrange_weights([(p.t - t2) / (t1 - t2) for p in pts], ratio)
    newest = pts[-1]
    newest.eps = sum(w * p.eps for w, p in zip(lw, pts))
    newest.x0 = sum(w * p.x0 for w, p in zip(lw, pts))


def check_compatible(model: Model, schedule: Schedule) -> None:
    if schedule.noise and noise_mod.from_dict(schedule.noise) != model.noise:
        raise ScheduleError(
            f"schedule: it was made for noise schedule {noise_mod.from_dict(schedule.noise)!r} "
            f"but the model uses {model.noise!r}; rebuild it for this model")


def _lookback(schedule: Schedule) -> int:
    """How many history points any step reaches back (a corrector sees one more, DC three)."""
    need = 3
    for st in schedule.steps:
        reach = max([-st.start, *(-p for p in st.derivative_points())])
        need = max(need, reach + (1 if st.corrector is not None else 0))
    return need


class _Buffers:
    """Recycles the tensors the sampler itself allocates once no step can reach them (allocating
    fresh memory every step costs more than the arithmetic on CPU)."""

    def __init__(self):
        self.free: list[Tensor] = []
        self.owned: set[int] = set()

    def new(self, like: Tensor) -> Tensor:
        t = self.free.pop() if self.free else torch.empty_like(like)
        self.owned.add(id(t))
        return t

    def release(self, *tensors: Tensor) -> None:
        for t in tensors:
            if id(t) in self.owned:
                self.owned.discard(id(t))
                self.free.append(t)


class _FreshTensors(_Buffers):
    """No reuse: every tensor stays valid (autograd can follow the loop; a caller may keep outputs)."""

    def new(self, like: Tensor) -> None:
        return None

    def release(self, *tensors: Tensor) -> None:
        pass


def _predictor_rule(st: Step) -> StepRule:
    return StepRule(st.prediction, st.order, st.start, st.derivative_points(), st.first_points, st.relaxation,
                    st.relaxation_coef, st.second_scale, st.basis)


def _corrector_rule(st: Step) -> StepRule | None:
    """The corrector's re-solve of the step, over the history with the new point appended: from the same
    start (one further back) through the new point and the step's first ``order - 2`` points."""
    c = st.corrector
    if c is None:
        return None
    corder = st.order + 1 if c.order is None else c.order
    points = (-1, *(p - 1 for p in st.derivative_points()[: corder - 2]))
    return StepRule(st.prediction, corder, st.start - 1, points, None, c.relaxation, c.relaxation_coef)


class Request(NamedTuple):
    """The loop needs the model's outputs (eps, x0) at state ``x``, time index ``j`` of ``schedule.times``."""

    j: int
    t: float
    alpha: float
    sigma: float
    x: Tensor
    buf: Tensor | None


def trajectory(schedule: Schedule, noise: NoiseSchedule, x_T: Tensor, data_mean: Tensor | None = None,
               callback: Callable[[int, Tensor], None] | None = None, *,
               dc_ratios: Sequence[float | Tensor] | None = None,
               times: Tensor | None = None, step_params: Sequence[dict] | None = None,
               reuse_buffers: bool = True) -> Generator[Request, tuple, Tensor]:
    """The sampler loop as a generator: it yields a ``Request`` whenever it needs the model and is
    sent back ``(eps, x0)``, or ``(eps, x0, x)`` when the model was evaluated at a state ``x`` other
    than the request's (which then replaces it); it returns the final state. ``TrajectoryRun`` drives it: ``sample``
    with a Model, an external loop (e.g. a diffusers pipeline) one model call at a time.

    ``dc_ratios`` (one per step; floats or 0-d tensors) replace the steps' ``dc_ratio``; a step with
    fewer than three outputs in its history is never compensated. ``reuse_buffers=False`` gives every
    intermediate its own tensor (needed to backpropagate through the loop, or to keep the outputs).
    ``times`` (a float64 tensor of ``len(schedule.times)`` decreasing values) replaces the schedule's times
    and ``step_params`` (one dict per step) its steps' ``relaxation_coef`` / ``second_scale``, and under
    ``"corrector"`` a dict of the same for the step's corrector (its ``relaxation_coef``); given as
    tensors they stay in the autograd graph (requests then carry 0-d tensors for t, alpha and sigma).
    """
    schedule.validate()
    if times is None:
        times_list = schedule.times
        times = torch.tensor(times_list, dtype=torch.float64)
        alphas, sigmas, lams = noise.alpha(times).tolist(), noise.sigma(times).tolist(), noise.lam(times).tolist()
    else:
        if times.shape != (len(schedule.times),):
            raise ValueError(f"times: {tuple(times.shape)} values for {len(schedule.times)} schedule times")
        times_list = list(times.unbind())
        alphas, sigmas, lams = (list(f(times).unbind()) for f in (noise.alpha, noise.sigma, noise.lam))
    nodes = [Node(*v) for v in zip(times_list, lams, alphas, sigmas)]
    bufs = _Buffers() if reuse_buffers else _FreshTensors()
    if dc_ratios is not None and len(dc_ratios) != len(schedule.steps):
        raise ValueError(f"dc_ratios: {len(dc_ratios)} values for {len(schedule.steps)} steps")

    def point(j: int, x: Tensor):
        eps, x0, *evaluated = yield Request(j, times_list[j], alphas[j], sigmas[j], x, bufs.new(x))
        if evaluated:  # the driver evaluated the model at its own copy of the state (e.g. one autograd follows)
            bufs.release(x)
            x = evaluated[0]
        return Point(*nodes[j], x, eps, x0)

    def drop(p: Point) -> None:
        bufs.release(p.x, p.eps, p.x0)

    x = x_T
    if schedule.afs != "none":
        eps, x0 = _afs_outputs(data_mean, x, alphas[0], sigmas[0], schedule.afs)
        hist = [Point(*nodes[0], x, eps, x0)]
    else:
        hist = [(yield from point(0, x))]
    n = len(schedule.steps)
    keep = _lookback(schedule)
    checks = _StateChecks(x_T.device)
    rules = [(_predictor_rule(st), _corrector_rule(st)) for st in schedule.steps]
    if step_params is not None:
        if len(step_params) != n:
            raise ValueError(f"step_params: {len(step_params)} entries for {n} steps")
        rules = [(replace(rule, **{k: v for k, v in params.items() if k != "corrector"}),
                  corr if "corrector" not in params else replace(corr, **params["corrector"]))
                 for (rule, corr), params in zip(rules, step_params)]
    for i, (st, (rule, correct)) in enumerate(zip(schedule.steps, rules)):
        j = i + 1
        last = i == n - 1
        ratio = st.dc_ratio if dc_ratios is None else dc_ratios[i]
        if (isinstance(ratio, Tensor) or ratio != 1.0) and len(hist) >= 3:
            newest = hist[-1]
            old = (newest.eps, newest.x0)
            _compensate(hist, ratio)
            bufs.release(*old)
        x = solve_step(hist, rule, nodes[j], out=None if last else bufs.new(x), t_of_lambda=noise.t_of_lambda)
        if not last:
            pt = yield from point(j, x)
            x = pt.x
            if correct is not None:
                hist.append(pt)
                x = solve_step(hist, correct, nodes[j], out=bufs.new(x))
                hist.pop()
                if st.corrector.kind == "implicit":
                    drop(pt)
                    pt = yield from point(j, x)
                    x = pt.x
                else:
                    bufs.release(pt.x)
                    pt = Point(pt.t, pt.lam, pt.alpha, pt.sigma, x, pt.eps, pt.x0)
            hist.append(pt)
            if len(hist) > keep:  # no later step reaches this far back
                drop(hist.pop(0))
        checks.after_step(x, i)  # a non-finite model output reaches the state by the next step
        if callback is not None:
            callback(i, x.clone())
    checks.finish()
    return x


def sample(model: Model, x_T: Tensor, schedule: Schedule, *,
           callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run ``schedule`` on ``model`` from the initial noise ``x_T``; returns the final samples.

    The schedule is validated first and nothing runs if it is invalid. A NaN or inf stops the
    run with ``NonFiniteError``. ``callback(i, x)`` gets a copy of the state after every step. Under
    ``torch.no_grad()`` the loop reuses its buffers; with autograd on, every intermediate is kept, so the
    samples are differentiable (in the network's parameters too).
    """
    schedule.validate()
    check_compatible(model, schedule)
    run = TrajectoryRun(trajectory(schedule, model.noise, x_T, model.data_mean, callback,
                                   reuse_buffers=not torch.is_grad_enabled()))
    return run.finish(lambda req: model.predict(req.x, req.t, req.alpha, req.sigma, req.buf))


class TrajectoryRun:
    """Drives a ``trajectory`` generator: ``request`` is the model call it waits for (None once it has
    finished, when ``result`` holds the final state). ``send`` answers the request; ``finish`` answers
    every request with ``respond`` and returns the final state. An error of the loop (a NonFiniteError)
    propagates from the call that resumed it, and ends the run."""

    def __init__(self, loop: Generator[Request, tuple, Tensor]):
        self.loop = loop
        self.request: Request | None = None
        self.result: Tensor | None = None
        self._resume(None)  # runs the loop to its first request (or to its end, with no model call)

    @property
    def done(self) -> bool:
        return self.request is None

    def send(self, outputs: tuple) -> Request | None:
        """Answer the current request with ``(eps, x0)`` or ``(eps, x0, x)`` (see ``trajectory``); returns
        the next request, or None when the loop has finished."""
        if self.request is None:
            raise RuntimeError("the sampler loop has finished; it takes no more model outputs")
        return self._resume(outputs)

    def _resume(self, outputs: tuple | None) -> Request | None:
        self.request = None  # stays None when the loop ends, or raises
        try:
            self.request = self.loop.send(outputs)
        except StopIteration as done:
            self.result = done.value
        return self.request

    def finish(self, respond: Callable[[Request], tuple]) -> Tensor:
        while self.request is not None:
            self._resume(respond(self.request))
        return self.result

    def close(self) -> None:
        """Stop the loop where it is (its final state is never computed)."""
        self.loop.close()
        self.request = None
