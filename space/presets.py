"""Hand-designed solvers as data: each function returns a Schedule for a given NFE.

Every preset takes the noise schedule (``noise``), a spacing name or an explicit list of
times (``spacing``), optional ``t_start`` / ``t_end``, and ``final_zero`` (append a last
first-order step to sigma = 0, as diffusers' ``final_sigmas_type="zero"`` does; that step
counts as one of the NFE steps).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence

import torch

from . import spacing as spacing_mod
from .errors import ScheduleError
from .noise import NoiseSchedule
from .schedule import MAX_ORDER, Corrector, Schedule, Step

PRESETS: dict[str, Callable[..., Schedule]] = {}
DESCRIPTIONS: dict[str, str] = {}


def preset(name: str, description: str):
    def register(fn):
        PRESETS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return register


def _times(noise: NoiseSchedule, steps: int, spacing, t_start, t_end, final_zero: bool) -> list[float]:
    if steps < 1:
        raise ScheduleError(f"NFE too small: this preset needs at least {1 + final_zero} model call(s)")
    n = steps - 1 if final_zero else steps
    if n < 1:
        raise ScheduleError("NFE too small for final_zero: need at least 2 model calls")
    if isinstance(spacing, str) and spacing.startswith("diffusers-"):
        return spacing_mod.make(noise, steps, spacing).tolist()
    times = spacing_mod.make(noise, n, spacing, t_start, t_end).tolist()
    return times + [0.0] if final_zero else times


def _spacing_name(spacing) -> str:
    return spacing if isinstance(spacing, str) else "explicit"


def _schedule(name: str, noise: NoiseSchedule, times: list[float], steps: list[Step], **meta) -> Schedule:
    return Schedule(t_start=times[0], steps=tuple(steps), noise=noise.to_dict(), name=name, meta=meta).validate()


def _orders(n: int, order: int, lower_order_final: bool, lower_order_final_below: int | None,
            times: list[float]) -> list[int]:
    out = []
    lof = lower_order_final and (lower_order_final_below is None or n < lower_order_final_below)
    for i in range(n):
        o = min(order, i + 1)
        if lof:
            o = min(o, n - i)
        if times[i + 1] == 0.0:
            o = 1
        out.append(o)
    return out


def _multistep(name, nfe, noise, spacing, t_start, t_end, final_zero, prediction, order, relaxation="none",
               corrector: str | None = None, lower_order_final=True, lower_order_final_below=None,
               second_scale=1.0, basis="lambda", **meta):
    top = MAX_ORDER - (corrector is not None)  # a corrector is one order above its predictor
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= top:
        why = f" (its corrector is one order higher, at most {MAX_ORDER})" if corrector is not None else ""
        raise ScheduleError(f"preset {name!r}: option 'order' is {order!r}; use 1 to {top}{why}")
    times = _times(noise, nfe, spacing, t_start, t_end, final_zero)
    n = len(times) - 1
    orders = _orders(n, order, lower_order_final, lower_order_final_below, times)
    pure_noise_start = float(noise.alpha(times[0])) == 0.0  # lambda = -inf there: no differences through it
    steps = []
    for i, o in enumerate(orders):
        if pure_noise_start:
            o = min(o, max(i, 1))
        c = None
        if corrector is not None and i < n - 1 and not (pure_noise_start and i == 0):
            c = Corrector("pseudo", relaxation=corrector if o == 1 else "none")
        steps.append(Step(t=times[i + 1], prediction=prediction, order=o,
                          relaxation=relaxation if o == 2 else "none",
                          second_scale=second_scale if o == 3 else 1.0, basis=basis, corrector=c))
    return _schedule(name, noise, times, steps, order=order, spacing=_spacing_name(spacing), **meta)


@preset("ddim", "DDIM (first-order exponential integrator; DPM-Solver-1)")
def ddim(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
         prediction: str = "data") -> Schedule:
    return _multistep("ddim", nfe, noise, spacing, t_start, t_end, final_zero, prediction, 1)


@preset("dpm-solver++-2m", "DPM-Solver++(2M), multistep, data prediction")
def dpmpp_2m(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
             lower_order_final=True, lower_order_final_below: int | None = 15) -> Schedule:
    """diffusers' defaults: first-order warm-up; lower order on the last step when fewer than 15 steps."""
    return _multistep("dpm-solver++-2m", nfe, noise, spacing, t_start, t_end, final_zero, "data", 2,
                      "dpmsolver-2", lower_order_final=lower_order_final,
                      lower_order_final_below=lower_order_final_below)


@preset("dpm-solver++-3m", "DPM-Solver++(3M), multistep, data prediction")
def dpmpp_3m(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
             lower_order_final=True, lower_order_final_below: int | None = 15, second_scale: float = 0.5) -> Schedule:
    """As DPM-Solver and diffusers implement it: exact first derivative, half the Taylor weight on the
    second (``second_scale=0.5``); pass ``second_scale=1`` for the full third-order Taylor step."""
    return _multistep("dpm-solver++-3m", nfe, noise, spacing, t_start, t_end, final_zero, "data", 3,
                      "dpmsolver-2", lower_order_final=lower_order_final,
                      lower_order_final_below=lower_order_final_below, second_scale=second_scale)


def _unipc(variant: str):
    def build(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
              order: int = 2, prediction: str = "data", lower_order_final=True) -> Schedule:
        """UniP-p predictor with UniC corrector on every step but the last (as diffusers' UniPC)."""
        bh = f"unipc-{variant}"
        return _multistep(bh, nfe, noise, spacing, t_start, t_end, final_zero, prediction, order, bh,
                          corrector=bh, lower_order_final=lower_order_final)
    return build


unipc_bh1 = preset("unipc-bh1", "UniPC with B(h) = h (UniP-p + UniC), order 2 by default")(_unipc("bh1"))
unipc_bh2 = preset("unipc-bh2", "UniPC with B(h) = e^h - 1 (UniP-p + UniC), order 2 by default")(_unipc("bh2"))


@preset("deis", "DEIS multistep (Lagrange interpolation of eps in lambda, integrated exactly), order 3 default")
def deis(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
         order: int = 3, lower_order_final=True, lower_order_final_below: int | None = 15) -> Schedule:
    return _multistep("deis", nfe, noise, spacing, t_start, t_end, final_zero, "noise", order,
                      lower_order_final=lower_order_final, lower_order_final_below=lower_order_final_below)


@preset("deis-tab", "DEIS tAB: Lagrange interpolation of eps in t (as the DEIS paper), order 3 default")
def deis_tab(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None, final_zero=False,
             order: int = 3, lower_order_final=True, lower_order_final_below: int | None = 15) -> Schedule:
    return _multistep("deis-tab", nfe, noise, spacing, t_start, t_end, final_zero, "noise", order,
                      lower_order_final=lower_order_final, lower_order_final_below=lower_order_final_below,
                      basis="t")


def _singlestep_orders(nfe: int, order: int) -> list[int]:
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    k, r = divmod(nfe, 3)
    if r == 0:
        return [3] * (k - 1) + [2, 1] if k > 1 else [2, 1]
    return [3] * k + [r]


def _singlestep(name, nfe, noise, spacing, t_start, t_end, prediction, order):
    if nfe < 1:
        raise ScheduleError(f"NFE too small: {name} needs at least 1 model call")
    orders = _singlestep_orders(nfe, order)
    outer = spacing_mod.make(noise, len(orders), spacing, t_start, t_end).tolist()
    if float(noise.sigma(outer[-1])) == 0 and orders[-1] > 1:  # a last step to sigma = 0 is first order
        orders = (_singlestep_orders(nfe - 1, order) if nfe > 1 else []) + [1]
        outer = spacing_mod.make(noise, len(orders), spacing, t_start, t_end).tolist()
    steps = []
    for o, s, t in zip(orders, outer[:-1], outer[1:]):
        lam_s, h = float(noise.lam(s)), float(noise.lam(t) - noise.lam(s))
        if o == 1:
            steps.append(Step(t=t, prediction=prediction))
        elif o == 2:
            s1 = float(noise.t_of_lambda(torch.tensor(lam_s + 0.5 * h, dtype=torch.float64)))
            steps += [Step(t=s1, prediction=prediction),
                      Step(t=t, prediction=prediction, order=2, start=-2, points=(-1,), relaxation="dpmsolver-2")]
        else:
            s1 = float(noise.t_of_lambda(torch.tensor(lam_s + h / 3, dtype=torch.float64)))
            s2 = float(noise.t_of_lambda(torch.tensor(lam_s + 2 * h / 3, dtype=torch.float64)))
            steps += [Step(t=s1, prediction=prediction),
                      Step(t=s2, prediction=prediction, order=2, start=-2, points=(-1,)),
                      Step(t=t, prediction=prediction, order=2, start=-3, points=(-1,))]
    return _schedule(name, noise, outer, steps, order=order, spacing=_spacing_name(spacing))


@preset("dpm-solver-2", "DPM-Solver-2, singlestep, noise prediction")
def dpm_solver_2(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None) -> Schedule:
    return _singlestep("dpm-solver-2", nfe, noise, spacing, t_start, t_end, "noise", 2)


@preset("dpm-solver-3", "DPM-Solver-3, singlestep, noise prediction (DPM-Solver-fast order split)")
def dpm_solver_3(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None) -> Schedule:
    return _singlestep("dpm-solver-3", nfe, noise, spacing, t_start, t_end, "noise", 3)


@preset("dpm-solver++-2s", "DPM-Solver++(2S), singlestep, data prediction")
def dpmpp_2s(nfe: int, noise: NoiseSchedule, spacing="logsnr", t_start=None, t_end=None) -> Schedule:
    return _singlestep("dpm-solver++-2s", nfe, noise, spacing, t_start, t_end, "data", 2)


@preset("euler", "Euler in the sigma/alpha coordinate (EDM); equal to DDIM")
def euler(nfe: int, noise: NoiseSchedule, spacing="karras", t_start=None, t_end=None, final_zero=False) -> Schedule:
    return _multistep("euler", nfe, noise, spacing, t_start, t_end, final_zero, "data", 1)


@preset("heun", "Heun (EDM): Euler step plus trapezoidal correction, 2 NFE per step, Euler last step")
def heun(nfe: int, noise: NoiseSchedule, spacing="karras", t_start=None, t_end=None, final_zero=False) -> Schedule:
    if nfe < 1:
        raise ScheduleError("NFE too small: heun needs at least 1 model call")
    n_steps = (nfe + 1) // 2 if nfe % 2 else nfe // 2 + 1
    n_corr = nfe - n_steps
    times = _times(noise, n_steps, spacing, t_start, t_end, final_zero)
    steps = [Step(t=times[i + 1], prediction="data",
                  corrector=Corrector("implicit", order=2, relaxation="heun") if i < n_corr else None)
             for i in range(n_steps)]
    return _schedule("heun", noise, times, steps, spacing=_spacing_name(spacing))


def get(name: str) -> Callable[..., Schedule]:
    if name not in PRESETS:
        close = ([k for k in PRESETS if k.startswith(name)] or difflib.get_close_matches(name, list(PRESETS)))[:3]
        said = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
        hint = f"did you mean {said}? " if close else ""
        raise ScheduleError(f"unknown preset {name!r}; {hint}run 'steptune presets' to list them")
    return PRESETS[name]


def split_specs(text: str) -> list[str]:
    """Comma-separated preset specs, each of which may carry several options itself: an entry ``key=value`` with no
    preset name before it continues the spec before it (``unipc-bh2:order=3,lower_order_final=false,ddim``)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "=" in part and ":" not in part.partition("=")[0]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def parse_spec(spec: str, **kwargs) -> tuple[Callable[..., Schedule], dict]:
    """The preset function and its options from a spec ``name`` or ``name:key=value,...`` (plus ``kwargs``),
    checked without building anything: a known name, known options, values of the options' types."""
    name, _, args = spec.partition(":")
    if name == "preset":
        raise ScheduleError(f"preset {spec!r}: name the preset without the 'preset:' prefix ({args}); the prefix "
                            "is for --schedule, where a file may be named instead")
    opts, given = dict(kwargs), set()  # the spec's own options override ``kwargs``
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ScheduleError(f"preset {spec!r}: option {item!r} must be key=value")
        if key.strip() in given:
            raise ScheduleError(f"preset {spec!r}: option {key.strip()!r} is given twice; give it once")
        given.add(key.strip())
        opts[key.strip()] = _parse_value(value.strip())
    fn = get(name)
    params = inspect.signature(fn).parameters
    known = [p for p in params if p not in ("nfe", "noise")]
    unknown = [k for k in opts if k not in known]
    if unknown:
        raise ScheduleError(f"preset {name!r} has no option {unknown[0]!r}; its options are {', '.join(known)}")
    for key, value in opts.items():
        _check_type(name, key, value, params[key])
    return fn, opts


def build(spec: str, nfe: int, noise: NoiseSchedule, **kwargs) -> Schedule:
    """A preset from a spec ``name`` or ``name:key=value,key=value`` (e.g. ``unipc-bh2:order=3``)."""
    fn, opts = parse_spec(spec, **kwargs)
    start, end = opts.get("t_start"), opts.get("t_end")
    if start is not None or end is not None:  # the one not given is the noise schedule's end, as spacing takes it
        start = float(noise.T) if start is None else start
        end = float(noise.t_min) if end is None else end
    if start is not None and not end < start:
        raise ScheduleError(f"preset {spec!r}: t_end {end:g} is not below t_start {start:g}; sampling runs from "
                            "t_start down to t_end")
    try:
        return fn(nfe, noise, **opts)
    except TypeError as e:
        raise ScheduleError(f"preset {spec.partition(':')[0]!r}: {e}") from None


def _check_type(name: str, key: str, value, param: inspect.Parameter) -> None:
    """Refuse an option value whose type does not match the option's default (bool, integer or number)."""
    default = param.default
    if default is None or default is inspect.Parameter.empty:
        return
    if value is None and "None" in str(param.annotation):
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise ScheduleError(f"preset {name!r}: option {key!r} must be {kind}, not {value!r}")


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def names() -> Sequence[str]:
    return list(PRESETS)
