"""Job files: one TOML file says what an overnight search does (validated before any work starts).

```toml
study = "digits-s3"
seed = 0

[problem]            # a built-in problem, or your model as module:factory with its conventions
name = "gmm-digits"
noise = "vp-linear"

[search]
method = "s3"
nfe = [4, 5, 6, 8, 10]

[budget]
evaluations = 300    # cheap-fidelity evaluations per NFE
time = "8h"          # wall clock for the whole job, confirmation included

[storage]
db = "sqlite:///runs/steptune.db"

[backend]
kind = "ray"         # or "local" (in-process)
address = "auto"     # an existing Ray cluster; leave out for a local instance
num_cpus = 1         # per evaluator

[refine]             # optional: refine the most promising searched schedule per NFE by gradient afterwards
nfe = "all"          # or a list of searched NFEs
interpolate = [7]    # optional: NFEs not searched, interpolated from the searched ones and refined too
```
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class JobError(ValueError):
    """A job file that cannot run: one sentence naming the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # true is not 1, "5" not 5


class ProblemSpec(_Section):
    name: str | None = None  # a built-in problem (gmm-digits, gmm-2d, ...)
    model: str | None = None  # module:factory of a user model
    noise: str | None = None
    prediction: str | None = None
    time_input: str | None = None
    time_scale: float | None = None
    guidance_scale: float | None = None
    shape: list[int] | None = None  # sample shape, when the factory does not say
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.model is None):
            raise ValueError("give exactly one of 'name' (a built-in problem) or 'model' (module:factory)")
        if self.model is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.model):
            raise ValueError(f"model {self.model!r} is not of the form module:factory")
        return self

    @field_validator("name", "noise", "prediction", "time_input")
    @classmethod
    def _known(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        from steptune.evaluators.load import NETWORK_PROBLEMS, PROBLEMS
        from steptune.space.model import PREDICTION_TYPES, TIME_INPUTS
        from steptune.space.noise import NAMED

        what, choices = {"name": ("problem", [*PROBLEMS, *NETWORK_PROBLEMS]), "noise": ("noise schedule", list(NAMED)),
                         "prediction": ("prediction", PREDICTION_TYPES),
                         "time_input": ("time input", TIME_INPUTS)}[info.field_name]
        if v not in choices:
            also = ', or give a network as model = "module:factory"' if info.field_name == "name" else ""
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(choices)}{also}")
        return v

    def describe(self) -> str:
        return self.name or self.model or "?"


class SearchSpec(_Section):
    method: str = "s3"
    nfe: list[int]
    batch: int | None = Field(default=None, ge=1)  # candidates asked at a time (default: fill the evaluators)
    lookahead: int | None = Field(default=None, ge=0, le=4)  # batches asked ahead of results (default: 1 on Ray)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from steptune.search import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; use one of {', '.join(METHODS)}")
        return v

    @field_validator("options")
    @classmethod
    def _method_options(cls, v: dict, info) -> dict:
        from steptune.search import check_options, searcher_class

        method = info.data.get("method")
        if method is not None:  # else its own error is the one reported
            check_options(searcher_class(method), v, method, key=None)
        return v

    @field_validator("nfe")
    @classmethod
    def _nfes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("give at least one NFE, each at least 1, e.g. nfe = [4, 5, 6]")
        return sorted(set(v))


class EvaluationSpec(_Section):
    cheap_samples: int = Field(default=64, ge=1)  # train-bank states per search evaluation
    train_samples: int = Field(default=256, ge=1)
    heldout_samples: int = Field(default=1024, ge=1)  # results are reported on this bank
    confirm: int = Field(default=3, ge=0)  # best candidates per NFE confirmed on the held-out bank
    baseline: bool = True  # evaluate the preset solvers on the held-out bank for comparison
    baseline_nfe: list[int] | None = None  # NFEs for the presets besides the searched ones (to see where they catch up)
    bank_seed: int = 0  # seed of the noise banks (the search's own seed is the job's seed)
    cache: str = "runs/cache"

    @field_validator("baseline_nfe")
    @classmethod
    def _positive_nfes(cls, v):
        if v is not None and any(n < 1 for n in v):
            raise ValueError(f"every NFE is a positive integer (got {[n for n in v if n < 1]})")
        return v

    @model_validator(mode="after")
    def _fits(self):
        if self.cheap_samples > self.train_samples:
            raise ValueError(f"cheap_samples ({self.cheap_samples}) is larger than train_samples "
                             f"({self.train_samples})")
        return self


class BudgetSpec(_Section):
    evaluations: int = Field(default=300, ge=1)  # per NFE
    time: float | None = None  # seconds; TOML may say "8h", "30m", "1h30m", "90s"

    @field_validator("time", mode="before")
    @classmethod
    def _duration(cls, v):
        return None if v is None else parse_duration(v)


class StorageSpec(_Section):
    db: str | None = None  # default: sqlite:///runs/steptune.db (or $STEPTUNE_DB)
    retry: float = 300.0  # seconds (or "5m"); how long a run waits for a database that stopped answering

    @field_validator("retry", mode="before")
    @classmethod
    def _duration(cls, v):
        return parse_duration(v)


class BackendSpec(_Section):
    kind: Literal["local", "ray"] = "local"
    address: str | None = None  # Ray: None starts a local instance; "auto" or host:port joins a cluster
    workers: int | None = Field(default=None, ge=1)  # evaluators; default one per GPU, else one per CPU slot
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    in_flight: int = Field(default=2, ge=1)  # candidates per call to an evaluator (Ray: more where they are quick)
    batched: bool = False  # evaluate a worker's queued candidates in one batched pass through the model
    max_attempts: int = Field(default=3, ge=1)  # per trial, over lost workers
    max_restarts: int = Field(default=3, ge=0)  # per evaluator actor
    # seconds (or "10m") one evaluation on cheap_samples states may take (scaled up with the samples) before its
    # evaluator is replaced and the trial re-queued; None: no limit (a model's speed varies too much for a default)
    trial_timeout: float | None = None

    @field_validator("trial_timeout", mode="before")
    @classmethod
    def _timeout(cls, v):
        return None if v is None else parse_duration(v)


class RefineSpec(_Section):
    """The ``[refine]`` stage: after the search, refine at each NFE by gradient the most promising of the best
    searched schedules of ``structures`` structures (steptune.refine.structure_parents) and the best preset; then,
    with ``neighbours``, schedules built from the neighbouring NFEs' best (steptune.refine.neighbour_pass)."""

    nfe: list[int] | Literal["all"] = "all"  # which searched NFEs
    iters: int = Field(default=300, ge=1)  # gradient iterations per NFE (at most; steptune.search.refine.ITERS)
    samples: int | None = Field(default=None, ge=1)  # train-bank states it fits on (default 128, or the whole bank)
    # shares of them, those of the largest error at each iteration, left out of the loss: each is screened with
    # every structure whose loss it changes enough (steptune.search.refine.GATE), the best refinement on the held-out
    # bank kept (steptune.search.refine.TRIMS); or one share
    trim: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(default=[0.0, 0.03], min_length=1)
    # schedules of distinct structures screened per NFE, the most promising refined on (steptune.search.refine
    # .STRUCTURES; 1: the best searched schedule alone)
    structures: int = Field(default=8, ge=1)
    # NFEs not searched: interpolated from the searched ones (steptune.space.retime.interpolate), then refined, the
    # best preset there too
    interpolate: list[int] = Field(default_factory=list)
    # then, in sweeps down and up the NFEs, refine at each NFE schedules built from its neighbours' best
    # (steptune.refine.neighbour_pass)
    neighbours: bool = True
    # seconds (or "1m", "90s") each refinement may take, its screening included; it then keeps its best so far
    time: float | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _duration(cls, v):
        return None if v is None else parse_duration(v)

    @field_validator("trim", mode="before")
    @classmethod
    def _one_trim(cls, v):
        return [v] if isinstance(v, int | float) and not isinstance(v, bool) else v


class Job(_Section):
    study: str = Field(min_length=1, max_length=200)
    seed: int = Field(default=0, ge=0)
    problem: ProblemSpec
    search: SearchSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    budget: BudgetSpec = BudgetSpec()
    storage: StorageSpec = StorageSpec()
    backend: BackendSpec = BackendSpec()
    refine: RefineSpec | None = None

    @model_validator(mode="after")
    def _refine_fits(self):
        r = self.refine
        if r is not None and r.nfe == []:
            raise ValueError(f"refine.nfe is empty, so nothing would be refined; refine some of search.nfe "
                             f"{self.search.nfe} or \"all\", or leave [refine] out")
        if r is not None and r.nfe != "all" and not set(r.nfe) <= set(self.search.nfe):
            raise ValueError(f"refine.nfe {sorted(set(r.nfe) - set(self.search.nfe))[0]} is not searched; refine "
                             f"some of search.nfe {self.search.nfe} or \"all\"")
        if r is not None and (set(r.interpolate) & set(self.search.nfe) or any(n < 1 for n in r.interpolate)):
            bad = sorted((set(r.interpolate) & set(self.search.nfe)) | {n for n in r.interpolate if n < 1})[0]
            raise ValueError(f"refine.interpolate {bad} is not an NFE the search leaves out; give NFEs of at least "
                             f"1 that are not in search.nfe {self.search.nfe}")
        if r is not None and r.samples is not None and r.samples > self.evaluation.train_samples:
            raise ValueError(f"refine.samples ({r.samples}) is larger than evaluation.train_samples "
                             f"({self.evaluation.train_samples})")
        return self

    def identity(self) -> dict:
        """What decides the search's results: a study resumed with a job that differs here is refused."""
        from steptune.evaluators.evaluator import BANK_VERSION

        search = self.search.model_dump()
        if search["lookahead"] is None:  # as studies made before the key existed recorded it
            del search["lookahead"]
        return {"seed": self.seed, "problem": self.problem.model_dump(), "search": search,
                "evaluation": self.evaluation.model_dump(exclude={"cache", "baseline", "baseline_nfe"}),
                "bank_version": BANK_VERSION}

    def with_overrides(self, **changes) -> Job:
        """A copy with ``section.key`` overrides (None values are ignored), validated again."""
        data = self.model_dump()
        for dotted, value in changes.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if key:
                data[section][key] = value
            else:
                data[section] = value
        return job_from_dict(data, where="the command-line options")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(v) -> float:
    """Seconds from a number or a text like "8h", "30m", "1h30m", "90s", "2d" or "90" (seconds)."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a text like '8h', '30m' or '1h30m'")
    if isinstance(v, (int, float)):
        secs = float(v)
    elif re.fullmatch(r"\d+(\.\d+)?", str(v).strip()):  # a number of seconds, as a command line gives it
        secs = float(str(v).strip())
    else:
        text = str(v).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{v!r} is not a duration; write e.g. '8h', '30m', '1h30m' or a number of seconds")
        secs = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(secs) or secs <= 0:
        raise ValueError(f"{v!r} is not a positive duration")
    return secs


def _describe(err: dict, names: dict[str, str] | None = None) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # not a union's form
    kind = err["type"]
    if names and loc in names and kind not in ("extra_forbidden", "missing"):  # as the caller's user wrote it
        return f"{names[loc]} {_shown(err.get('input'))}: {err['msg'].removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        section, _, key = loc.rpartition(".")
        model = {"": Job, "problem": ProblemSpec, "search": SearchSpec, "evaluation": EvaluationSpec,
                 "budget": BudgetSpec, "storage": StorageSpec, "backend": BackendSpec,
                 "refine": RefineSpec}.get(section)
        fields = list(model.model_fields) if model else []
        where = f"in [{section}]" if section else "at the top level"
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{loc}' {where}{hint}; known keys: {', '.join(fields)}"
    if kind == "missing":
        return f"missing key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"key '{loc}': {msg} (got {err.get('input')!r})"
    return f"key '{loc}': {msg}" if loc else msg


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; raises JobError with one sentence naming the file and key."""
    path = Path(path)
    if path.is_dir():
        raise JobError(f"{path}: a folder, not a job file; give a TOML file such as examples/gmm-2d-quick.toml")
    if not path.is_file():
        raise JobError(f"{path}: no such job file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise JobError(f"{path}: not a text file in UTF-8 (byte {e.start} cannot be read); save the job file as "
                       "UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: not valid TOML ({e})") from None
    return job_from_dict(data, where=str(path))


def _shown(v) -> str:
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)


def job_from_dict(data: dict, where: str = "job", names: dict[str, str] | None = None) -> Job:
    """Validate a job given as a dict; raises JobError with one sentence starting with ``where``. ``names``: how
    the caller's user wrote some keys (``{"evaluation.confirm": "--confirm"}``), for the sentence to name them so."""
    try:
        return Job.model_validate(data)
    except ValidationError as e:
        errors = e.errors()  # a misspelled key says more than the key it misses ('studdy' for 'study')
        first = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        if first["type"] != "extra_forbidden" and any(x["loc"][:-1] == first["loc"][:-1] for x in errors[1:]):
            first = _union(errors, first)
        raise JobError(f"{where}: {_describe(first, names)}") from None


def _union(errors: list[dict], first: dict) -> dict:
    """A key that takes one of several forms (``nfe = [4, 5]`` or ``"all"``) fails in each: one error naming them."""
    loc = first["loc"][:-1]
    forms = [x for x in errors if x["loc"][:-1] == loc and len(x["loc"]) == len(first["loc"])]
    if len(forms) < 2:
        return first
    said = " or ".join(_form(x) for x in forms)
    return {**first, "loc": loc, "type": "union", "msg": f"give {said} (got {first.get('input')!r})"}


def _form(err: dict) -> str:
    """How one form of a key is written: the literal values it allows, else its type."""
    expected = (err.get("ctx") or {}).get("expected")
    if err["type"] == "literal_error" and expected:
        return expected
    return {"list[int]": "a list of whole numbers"}.get(str(err["loc"][-1]), str(err["loc"][-1]))
