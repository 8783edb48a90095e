"""The Schedule: a sampler written down as per-step decisions, with validation and a JSON form."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from . import noise as noise_mod
from .errors import ScheduleError, unknown_field
from .relaxation import RELAXATIONS

SCHEMA_VERSION = 1

PREDICTIONS = ("noise", "data")
CORRECTORS = ("pseudo", "implicit")
AFS = ("none", "zero", "mean")
BASES = ("lambda", "t")
MAX_ORDER = 4
SPACE_KEPT = ("_lams", "_logits")  # what a search space keeps on a schedule (steptune.search.space): not the schedule's


class _kept:
    """``functools.cached_property`` without its lock (a step is made and read in one thread; Python 3.11's
    per-property lock costs more than most of what a step keeps)."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class Corrector:
    """UniC-style corrector: re-solve the step from the same start with the new point added.

    ``kind="pseudo"`` keeps the model output at the predicted point (no extra NFE, as UniPC);
    ``kind="implicit"`` evaluates the model again at the corrected point (one more NFE, as Heun).
    ``order`` is the order of the corrected update (default: the step's order + 1); it uses the
    new point and the step's first ``order - 2`` derivative points. ``relaxation`` and
    ``relaxation_coef`` scale its first-derivative term as a step's do.
    """

    kind: str = "pseudo"
    order: int | None = None
    relaxation: str = "none"
    relaxation_coef: float = 0.0


@dataclass(frozen=True)
class Step:
    """One step of a schedule, from the starting point in the history to time ``t``.

    History indices are negative: -1 is the newest point (the current state).
    ``points`` are the history points used to estimate derivatives (default: the ``order - 1``
    points before ``start``); ``first_points`` uses only the first m of them for the first
    derivative (low-order estimation). ``relaxation`` scales the first-derivative term (the kind's
    factor times 1 + ``relaxation_coef`` h, h the step's log-SNR length) and
    ``second_scale`` the second-derivative term (DPM-Solver(++)-3M as implemented uses 1/2).
    ``basis="t"`` replaces the lambda-Taylor expansion by Lagrange interpolation in t through the
    start and the points (DEIS's tAB), integrated exactly against the exponential kernel.
    ``dc_ratio`` re-times the newest model output to t_{-2} + ratio (t_{-1} - t_{-2}) before the
    step (DC-Solver compensation; 1 means none).
    """

    t: float
    prediction: str = "data"
    order: int = 1
    start: int = -1
    points: tuple[int, ...] | None = None
    first_points: int | None = None
    relaxation: str = "none"
    relaxation_coef: float = 0.0
    second_scale: float = 1.0
    basis: str = "lambda"
    corrector: Corrector | None = None
    dc_ratio: float = 1.0

    def at(self, t: float) -> Step:
        """The same decisions ending at ``t`` (``evolve(step, t=t)``: searchers re-time every step of thousands of
        candidates); the step itself where ``t`` is its time, to the sign of a zero and the type of the number."""
        if t == self.t and type(t) is type(self.t) and (t != 0 or math.copysign(1.0, t) == math.copysign(1.0, self.t)):
            return self
        out = object.__new__(Step)
        out.__dict__.update(self.__dict__)
        out.__dict__["t"] = t
        return out

    @_kept
    def decisions_text(self) -> str:
        """The step's compact JSON text without its time, keys sorted, as :meth:`Schedule.structure_key` writes it
        (kept on the step: :meth:`at` keeps it, :func:`evolve` drops it)."""
        d = _compact(self)
        del d["t"]
        return _ENCODER.encode(d)

    @_kept
    def decisions_problem(self) -> str | None:
        """What is wrong with the step's decisions wherever it stands (time and history aside), or None (kept on
        the step like :attr:`decisions_text`)."""
        return _decisions_problem(self)

    @_kept
    def oldest_point(self) -> int:
        """The oldest history point the step uses: its start or a derivative point (kept like
        :attr:`decisions_text`)."""
        return min((self.start, *self.derivative_points()))

    def derivative_points(self) -> tuple[int, ...]:
        if self.points is not None:
            return tuple(self.points)
        return tuple(self.start - k for k in range(1, self.order))


@dataclass(frozen=True)
class Schedule:
    """A whole sampler: start time, per-step decisions and global choices.

    ``noise`` is the identity (``NoiseSchedule.to_dict()``) of the noise schedule whose time
    axis the timesteps live on; ``afs`` is the analytical first step (``zero``: x0 = 0,
    ``mean``: x0 = the data mean the model provides), which saves the first model call.
    ``name`` and ``meta`` are labels: they say nothing about what the schedule does.
    """

    LABELS: ClassVar[tuple[str, ...]] = ("name", "meta")

    t_start: float
    steps: tuple[Step, ...]
    noise: dict = field(default_factory=dict)
    afs: str = "none"
    name: str = ""
    conventions: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def times(self) -> list[float]:
        return [self.t_start, *(s.t for s in self.steps)]

    @property
    def nfe(self) -> int:
        """Model calls: one at the start (unless AFS), one after every step but the last,
        and one more per implicit corrector."""
        n = self.__dict__.get("_nfe")
        if n is None:  # kept like the verdict on the steps: searchers ask it of every candidate many times
            n = (self.afs == "none") + max(len(self.steps) - 1, 0)
            n = self.__dict__["_nfe"] = n + sum(1 for s in self.steps
                                                 if s.corrector is not None and s.corrector.kind == "implicit")
        return n

    def validate(self, nfe: int | None = None) -> Schedule:
        if not self.__dict__.get("_valid_steps"):  # kept: the search space, the searcher and storage all check it
            _validate_steps(self)
            self.__dict__["_valid_steps"] = True
        _validate_noise_start(self)  # asked every time: a noise dict changed in place is checked as it is now
        if nfe is not None and self.nfe != nfe:
            raise ScheduleError(f"schedule: costs {self.nfe} model calls but NFE {nfe} was asked for")
        return self

    def __getstate__(self) -> dict:
        """A copy or a pickle carries the schedule, not what a search space keeps on it (the space itself)."""
        return {k: v for k, v in self.__dict__.items() if k not in SPACE_KEPT}

    def with_steps(self, steps: Sequence[Step]) -> Schedule:
        return evolve(self, steps=tuple(steps))

    def to_dict(self, *, shared: bool = False) -> dict:
        """The versioned JSON form. ``shared``: its nested dicts are the schedule's own (no copy), for a caller that
        only serialises it and changes nothing."""
        d = self._json_fields()
        return {"schema": "steptune.schedule", "version": SCHEMA_VERSION, "nfe": self.nfe,
                **(d if shared else copy.deepcopy(d))}

    def key(self) -> str:
        """The schedule's identity: SHA-256 of its JSON form without the labels (every other field, each
        step's in full). Two schedules share it exactly when those fields are equal, number for number (the
        JSON form keeps 1 and 1.0 apart). Databases store it with every trial."""
        return self._digest(timed=True)

    def structure_key(self) -> str:
        """:meth:`key` without the timesteps: schedules that differ only in their times share it."""
        return self._digest(timed=False)

    def _digest(self, timed: bool) -> str:
        """SHA-256 of ``json.dumps(identity, sort_keys=True, separators=(",", ":"))``, written from each step's
        text (made once per step object: children share most steps with their parents)."""
        text = "{" + ",".join([self._field_text(name, timed) for name in _identity_fields()]) + "}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _field_text(self, name: str, timed: bool = True) -> str:
        if name == "steps":
            return '"steps":[' + ",".join([_step_text(st, timed) for st in self.steps]) + "]"
        return f'"{name}":' + _value_text(getattr(self, name))

    def json_text_and_key(self) -> tuple[str, str]:
        """``json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))`` (what storage keeps of a schedule)
        and :meth:`key`, from one pass over the per-step texts the key is written from."""
        texts = {name: self._field_text(name) for name in _identity_fields()}
        key = hashlib.sha256(("{" + ",".join(texts.values()) + "}").encode()).hexdigest()
        head = {"nfe": str(self.nfe), "schema": '"steptune.schedule"', "version": str(SCHEMA_VERSION)}
        parts = [texts[name] if name in texts else f'"{name}":{head[name]}' if name in head else
                 self._field_text(name) for name in _json_names()]
        return "{" + ",".join(parts) + "}", key

    def _json_fields(self) -> dict:
        """Every field in its JSON form (steps compacted), sharing the schedule's own dicts."""
        return {f.name: [_compact(st) for st in self.steps] if f.name == "steps" else getattr(self, f.name)
                for f in fields(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> Schedule:
        return _from_dict(d, where)

    @classmethod
    def from_json(cls, text: str, where: str = "schedule") -> Schedule:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        return _from_dict(d, where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


def load_schedule(path: str | Path) -> Schedule:
    """Read a schedule JSON file (an export's too; its provenance is read by ``steptune.exports.read_export``), or
    the folder or scheduler config ``steptune export --format diffusers`` wrote, and validate it."""
    path = schedule_file(path)
    sched = _from_dict(schedule_json(schedule_text(path), str(path)), str(path))
    try:
        return sched.validate()
    except ScheduleError as e:
        raise ScheduleError(f"{path}: {e}") from None


def schedule_file(path: str | Path) -> Path:
    """The file a schedule is read from: ``path``, or the scheduler config in a folder that ``steptune export
    --format diffusers`` wrote (a ScheduleError where there is none)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "scheduler_config.json").is_file():
            raise ScheduleError(f"{path}: a folder without a scheduler_config.json; give a schedule JSON file or a "
                                "folder 'steptune export --format diffusers' wrote")
        path = path / "scheduler_config.json"
    if not path.is_file():
        raise ScheduleError(f"{path}: no such schedule file")
    return path


def schedule_text(path: Path) -> str:
    """The text of the schedule file ``path`` (a ScheduleError where it is not text)."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ScheduleError(f"{path}: not a text file; a schedule file is JSON") from None


def schedule_json(text: str, where: str):
    """The schedule in JSON ``text`` (see :func:`schedule_part`), parsed; a ScheduleError where it is not JSON."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                            "fix the file") from None
    return schedule_part(d)


def schedule_part(d):
    """The schedule in parsed JSON: a diffusers export's scheduler config carries the whole schedule (not its
    provenance) under ``schedule``; anything else is given back as it is."""
    if isinstance(d, dict) and d.get("_class_name") == "SteptuneScheduler" and isinstance(d.get("schedule"), dict):
        return d["schedule"]
    return d


_STEP_DEFAULTS = asdict(Step(t=0.0))
_FIELDS = ("t_start", "steps", "noise", "afs", "name", "conventions", "meta")
TOP_FIELDS = ("schema", "version", "nfe", *_FIELDS)  # a schedule file's; an export adds its "provenance"
_SEPARATORS = (",", ":")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=_SEPARATORS)


@lru_cache(maxsize=1)
def _identity_fields() -> tuple[str, ...]:
    """The fields a schedule's key covers, in the order ``json.dumps(..., sort_keys=True)`` writes them."""
    return tuple(sorted(f.name for f in fields(Schedule) if f.name not in Schedule.LABELS))


@lru_cache(maxsize=1)
def _json_names() -> tuple[str, ...]:
    """The keys of :meth:`Schedule.to_dict`, sorted."""
    return tuple(sorted({"schema", "version", "nfe", *(f.name for f in fields(Schedule))}))


def _value_text(v) -> str:
    """``v`` as the key's JSON writes it (``_ENCODER``), the texts a schedule's fields most often hold written
    directly: a finite float, a plain ASCII word, an empty mapping, and its noise dict (kept for the dict,
    :func:`_kept_for`)."""
    kind = type(v)
    if kind is float and math.isfinite(v):
        return repr(v)
    if kind is str and v.isascii() and v.isprintable() and '"' not in v and "\\" not in v:
        return f'"{v}"'
    if kind is dict:
        if not v:
            return "{}"
        return _kept_for(_DICT_TEXTS, v, id(v), lambda: _ENCODER.encode(v))
    return _ENCODER.encode(v)


def _kept_for(cache: dict, d: dict, key, work):
    """``work()``, kept in ``cache`` under ``key`` for the dict ``d`` (schedules made from one another share their
    dicts): a kept answer holds while ``d`` is the same dict and equal to a copy taken with it, so a dict changed in
    place is worked out again."""
    hit = cache.get(key)
    if hit is not None and hit[0] is d and hit[1] == d:
        return hit[2]
    if len(cache) > 1000:
        cache.clear()
    value = work()
    cache[key] = (d, copy.deepcopy(d), value)
    return value


_DICT_TEXTS: dict[int, tuple[dict, dict, str]] = {}


def _step_text(step: Step, timed: bool) -> str:
    """The step's compact JSON text as a key writes it, with its time or without: "t" sorts after every other
    field, so the time closes the object."""
    text = step.decisions_text
    if not timed:
        return text
    return text[:-1] + ',"t":' + _value_text(step.t) + "}"


def evolve(obj, **changes):
    """``dataclasses.replace(obj, **changes)`` for the schedule's frozen dataclasses (Step, Corrector, Schedule),
    without its cost: they have no ``__post_init__``, so a copy of the fields with the changes is the same object
    (less what it keeps about itself, unless only a step's time or a schedule's labels change: a step's decision
    texts and oldest history point, a schedule's verdict on its steps)."""
    names = obj.__dataclass_fields__
    for k in changes:
        if k not in names:
            raise TypeError(f"{type(obj).__name__} has no field {k!r}")
    out = object.__new__(type(obj))
    out.__dict__.update(obj.__dict__)
    out.__dict__.update(changes)
    if changes.keys() - _KEEPS_CACHES.get(type(obj), frozenset()):
        for cached in _CACHES.get(type(obj), ()):
            out.__dict__.pop(cached, None)
    return out


# what a step or schedule keeps about itself once worked out, and the changes that leave it as it was
_CACHES = {Step: ("decisions_text", "decisions_problem", "oldest_point"),
           Schedule: ("_valid_steps", "_nfe", *SPACE_KEPT)}
_KEEPS_CACHES = {Step: frozenset({"t"}), Schedule: frozenset(Schedule.LABELS)}


_CORRECTOR_DEFAULTS = asdict(Corrector())


def _compact(step: Step) -> dict:
    """The step's JSON object: t, prediction, order, and the other fields where they differ from the default."""
    out = {k: getattr(step, k) for k, default in _STEP_DEFAULTS.items()
           if k in ("t", "prediction", "order") or getattr(step, k) != default}
    if out.get("points") is not None:
        out["points"] = list(out["points"])
    if out.get("corrector") is not None:
        c = out["corrector"]
        out["corrector"] = {k: getattr(c, k) for k, default in _CORRECTOR_DEFAULTS.items()
                            if k == "kind" or getattr(c, k) != default}
    return out


def not_a_schedule(d, where: str) -> ScheduleError:
    """The refusal of JSON that is not a steptune schedule, saying what it is where that can be told (a diffusers
    scheduler's config holds no timesteps or per-step decisions)."""
    name = d.get("_class_name") if isinstance(d, dict) else None
    if isinstance(name, str) and "_diffusers_version" in d:
        return ScheduleError(f"{where}: a diffusers {name} config, not a steptune schedule: it holds the scheduler's "
                             "settings, not its timesteps or per-step decisions; 'steptune sweep' measures diffusers' "
                             "default schedulers beside the presets, and 'steptune schedule preset:NAME' writes a "
                             "preset as a schedule file")
    return ScheduleError(f"{where}: not a steptune schedule (missing \"schema\": \"steptune.schedule\")")


def _from_dict(d: dict, where: str) -> Schedule:
    if not isinstance(d, dict) or d.get("schema") != "steptune.schedule":
        raise not_a_schedule(d, where)
    version = d.get("version")
    if not isinstance(version, int):
        raise ScheduleError(f"{where}: field 'version' must be an integer")
    if version > SCHEMA_VERSION:
        raise ScheduleError(
            f"{where}: schedule schema version {version} is newer than this steptune understands "
            f"({SCHEMA_VERSION}); upgrade steptune to read it")
    unknown = [k for k in d if k not in TOP_FIELDS and k != "provenance"]
    if unknown:
        said = unknown_field(unknown[0], (*TOP_FIELDS, "provenance"), at=" at the top level")
        raise ScheduleError(f"{where}: {said}")
    kwargs = {k: v for k, v in d.items() if k in _FIELDS}
    if "t_start" not in kwargs or "steps" not in kwargs:
        raise ScheduleError(f"{where}: a schedule needs 't_start' and 'steps'")
    if not isinstance(kwargs["steps"], list):
        raise ScheduleError(f"{where}: field 'steps' must be a list")
    step_fields = set(_STEP_DEFAULTS)
    steps = []
    for i, s in enumerate(kwargs["steps"]):
        if not isinstance(s, dict):
            raise ScheduleError(f"{where}: step {i}: must be an object")
        unknown = set(s) - step_fields
        if unknown:
            raise ScheduleError(f"{where}: step {i}: {unknown_field(sorted(unknown)[0], step_fields)}")
        s = dict(s)
        if s.get("points") is not None:
            s["points"] = tuple(s["points"])
        if s.get("corrector") is not None:
            c = s["corrector"]
            bad = set(c) - set(_CORRECTOR_DEFAULTS)
            if bad:
                said = unknown_field(sorted(bad)[0], _CORRECTOR_DEFAULTS, "corrector field")
                raise ScheduleError(f"{where}: step {i}: {said}")
            s["corrector"] = Corrector(**c)
        try:
            steps.append(Step(**s))
        except TypeError as e:
            raise ScheduleError(f"{where}: step {i}: {e}") from None
    kwargs["steps"] = tuple(steps)
    if kwargs.get("noise", {}) != {}:  # {} (or none): the schedule names no noise schedule
        try:
            noise_mod.from_dict(kwargs["noise"])
        except ScheduleError as e:
            raise ScheduleError(f"{where}: field 'noise': {e}") from None
    sched = Schedule(**kwargs)
    declared = d.get("nfe")
    if declared is not None and declared != sched.nfe:
        raise ScheduleError(f"{where}: field 'nfe' says {declared} but the steps cost {sched.nfe} model calls")
    return sched


def _number(x) -> bool:
    if type(x) is float:
        return math.isfinite(x)
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_NOISE_FACTS: dict[tuple[int, float], tuple[dict, dict, tuple[bool, float, str]]] = {}


def _noise_facts(noise: dict, t: float) -> tuple[bool, float, str]:
    """Whether alpha(t) = 0 on the noise schedule ``noise`` names, its last time T and its kind (kept for the
    dict, :func:`_kept_for`)."""
    def work():
        ns = noise_mod.from_dict(noise)
        return float(ns.alpha(t)) == 0.0, float(ns.T), ns.kind

    return _kept_for(_NOISE_FACTS, noise, (id(noise), t), work)


def _fail(msg: str):
    raise ScheduleError(msg)


def _validate_noise_start(s: Schedule) -> None:
    """On a discrete noise schedule, the start at its last entry (t = 1) at the latest: the network knows no later
    timestep (a continuous schedule extends past its T, as a rescaled sigma list may need); where alpha(t_start) = 0
    (rectified flow from t = 1), lambda = -inf at the start point: only first-order data-prediction steps may use
    it."""
    if not s.noise:
        return
    alpha_zero, last, kind = _noise_facts(s.noise, s.t_start)
    if kind == "vp-discrete" and s.t_start > last * (1 + 1e-12):
        _fail(f"schedule: field 't_start' = {s.t_start:g} is beyond the last time of its discrete noise schedule "
              f"(T = {last:g}, its table's last timestep); start at T or before it")
    if not alpha_zero:
        return
    for i, st in enumerate(s.steps):
        h = i + 1
        if h + st.start == 0 and st.prediction == "noise":
            _fail(f"step {i}: field 'prediction' is 'noise' but the step starts at t_start = {s.t_start:g}, where "
                  "alpha = 0; use data prediction there")
        used = {h + st.start} | ({h + p for p in st.derivative_points()} if st.order > 1 else set())
        if (st.order > 1 or st.corrector is not None) and 0 in used:
            _fail(f"step {i}: field 'order' is {st.order}{' with a corrector' if st.corrector else ''} but it uses "
                  f"t_start = {s.t_start:g}, where alpha = 0 and lambda = -inf (no derivative in lambda exists "
                  "there); use order 1 without corrector for steps that touch it")


def _validate_steps(s: Schedule) -> None:
    """What the start, the end and the steps' times and decisions allow (the noise dict aside)."""
    if not s.steps:
        _fail("schedule: needs at least one step")
    if s.afs not in AFS:
        _fail(f"schedule: field 'afs' is {s.afs!r}; use one of {', '.join(AFS)}")
    if not _number(s.t_start):
        _fail("schedule: field 't_start' must be a finite number")
    prev = s.t_start
    last = len(s.steps) - 1
    for i, st in enumerate(s.steps):
        hist = i + 1  # history points before step i: the start point, and one after each step before it
        t = st.t
        if not _number(t):
            _fail(f"step {i}: field 't' must be a finite number")
        if not t < prev:
            _fail(f"step {i}: field 't' = {t:g} is not below the previous time {prev:g}; timesteps must decrease "
                  "strictly")
        if t < 0:
            _fail(f"step {i}: field 't' = {t:g} is negative")
        prev = t
        problem = st.decisions_problem
        if problem is not None:
            _fail(f"step {i}: {problem}")
        if st.oldest_point < -hist:
            if not -hist <= st.start:
                _fail(f"step {i}: field 'start' is {st.start!r}; only {hist} history point(s) exist (use -1 .. "
                      f"-{hist})")
            p = next(p for p in st.derivative_points() if p < -hist)
            _fail(f"step {i}: field 'order' is {st.order} but the step needs history point {p} and only {hist} "
                  "exist; lower the order or use fewer points")
        if st.dc_ratio != 1.0 and hist < 3:
            _fail(f"step {i}: field 'dc_ratio' needs 3 model outputs in the history; only {hist} exist here")
        if t == 0 and (st.order > 1 or st.corrector is not None):
            _fail(f"step {i}: a step to t = 0 (sigma = 0) must be order 1 without corrector")
        if st.corrector is not None and i == last:
            _fail(f"step {i}: field 'corrector' is set on the last step, where no model call follows; remove it")


def _decisions_problem(st: Step) -> str | None:
    """What is wrong with a step's decisions wherever it stands (its time and history aside), or None."""
    if st.prediction not in PREDICTIONS:
        return f"field 'prediction' is {st.prediction!r}; use 'noise' or 'data'"
    if not isinstance(st.order, int) or not 1 <= st.order <= MAX_ORDER:
        return f"field 'order' is {st.order!r}; use an integer from 1 to {MAX_ORDER}"
    if not isinstance(st.start, int) or not st.start <= -1:
        return f"field 'start' is {st.start!r}; use a history index -1 or below (-1 is the newest point)"
    pts = st.derivative_points()
    if len(pts) < st.order - 1:
        return f"field 'points' has {len(pts)} point(s); order {st.order} needs at least {st.order - 1}"
    if len(set(pts)) != len(pts) or st.start in pts:
        return "field 'points' must be distinct history points other than the start"
    for p in pts:
        if not isinstance(p, int) or not p <= -1:
            return f"field 'points' has {p!r}; use history indices -1 or below"
    if st.first_points is not None and not (isinstance(st.first_points, int) and 1 <= st.first_points <= len(pts)):
        return f"field 'first_points' must be between 1 and {len(pts)}"
    if st.relaxation not in RELAXATIONS:
        return f"field 'relaxation' is {st.relaxation!r}; use one of {', '.join(RELAXATIONS)}"
    if not _number(st.relaxation_coef):
        return "field 'relaxation_coef' must be a finite number"
    if st.relaxation != "none" and st.order < 2:
        return "field 'relaxation' scales the first derivative, which an order-1 step does not use"
    if not _number(st.second_scale):
        return "field 'second_scale' must be a finite number"
    if st.second_scale != 1.0 and st.order < 3:
        return f"field 'second_scale' scales the second derivative, which an order-{st.order} step does not use"
    if st.basis not in BASES:
        return f"field 'basis' is {st.basis!r}; use 'lambda' or 't'"
    if st.basis == "t" and (st.relaxation != "none" or st.second_scale != 1.0 or st.first_points is not None):
        return ("field 'basis' is 't', which interpolates through all points; relaxation, second_scale and "
                "first_points apply to the lambda basis only")
    if not _number(st.dc_ratio) or st.dc_ratio <= 0:
        return "field 'dc_ratio' must be a positive number (1 = no compensation)"
    c = st.corrector
    if c is not None:
        if c.kind not in CORRECTORS:
            return f"corrector field 'kind' is {c.kind!r}; use 'pseudo' or 'implicit'"
        corder = st.order + 1 if c.order is None else c.order
        if not isinstance(corder, int) or not 2 <= corder <= min(MAX_ORDER, len(pts) + 2):
            return f"corrector field 'order' is {corder!r}; use 2 .. {min(MAX_ORDER, len(pts) + 2)}"
        if c.relaxation not in RELAXATIONS:
            return f"corrector field 'relaxation' is {c.relaxation!r}; use one of {', '.join(RELAXATIONS)}"
        if not _number(c.relaxation_coef):
            return "corrector field 'relaxation_coef' must be a finite number"
    return None
