"""A schedule's one identity, Schedule.key(): every field counts but the labels, and the key databases hold is it."""

import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from steptune.search.space import DecisionSpace
from steptune.space import Corrector, Schedule, ScheduleError, Step, noise
from steptune.space.schedule import evolve

FIXTURE_DB = Path(__file__).parent / "data" / "pre-redesign.db"


def rich_schedule() -> Schedule:
    """A schedule in which no field holds None, so that every field can be changed alone."""
    corrector = Corrector(kind="implicit", order=3, relaxation="heun", relaxation_coef=0.25)
    steps = tuple(Step(t=t, prediction="noise", order=2, start=-1, points=(-2,), first_points=1, relaxation="linear",
                       relaxation_coef=0.5, second_scale=0.75, basis="t", corrector=corrector, dc_ratio=1.125)
                  for t in (0.75, 0.5, 0.25))
    return Schedule(t_start=1.0, steps=steps, noise=noise.get("vp-linear").to_dict(), afs="zero", name="rich",
                    conventions={"prediction": "eps"}, meta={"note": "n"})


def other_value(v):
    """A value of the same kind that differs from ``v`` (and is not its JSON equal)."""
    if dataclasses.is_dataclass(v):
        return None
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v - 1 if isinstance(v, int) else v + 0.375
    if isinstance(v, str):
        return v + "-other"
    if isinstance(v, tuple):
        return (*v, min(v) - 1)
    if isinstance(v, dict):
        return {**v, "other": 1}
    raise AssertionError(f"no changed value for {v!r}")


def single_changes(s: Schedule):
    """(where, changed schedule) for every field of the schedule, of every step and of every corrector, found by
    introspection; a dataclass-valued field is also changed field by field."""
    def variants(obj, where):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "steps":
                for i, st in enumerate(v):
                    for w, new in variants(st, f"{where}.steps[{i}]"):
                        yield w, dataclasses.replace(obj, steps=(*v[:i], new, *v[i + 1:]))
                continue
            assert v is not None, f"{where}.{f.name} is None; give rich_schedule() a value there"
            yield f"{where}.{f.name}", dataclasses.replace(obj, **{f.name: other_value(v)})
            if dataclasses.is_dataclass(v):
                for w, new in variants(v, f"{where}.{f.name}"):
                    yield w, dataclasses.replace(obj, **{f.name: new})

    return list(variants(s, "schedule"))


def test_the_rich_schedule_is_valid_json_and_every_field_is_changed():
    s = rich_schedule()
    assert Schedule.from_dict(json.loads(s.to_json())) == s
    changed = [w for w, _ in single_changes(s)]

    def fields_under(prefix):
        return {w[len(prefix):] for w in changed if w.startswith(prefix) and "." not in w[len(prefix):]}

    assert fields_under("schedule.") == {f.name for f in dataclasses.fields(Schedule)} - {"steps"}
    assert fields_under("schedule.steps[2].") == {f.name for f in dataclasses.fields(Step)}
    assert fields_under("schedule.steps[0].corrector.") == {f.name for f in dataclasses.fields(Corrector)}


def test_changing_any_single_field_changes_the_key():
    base = rich_schedule()
    for where, s in single_changes(base):
        if where.rsplit(".", 1)[1] in Schedule.LABELS and where.count(".") == 1:
            assert s.key() == base.key(), f"{where} is a label; it must not change the key"
        else:
            assert s.key() != base.key(), f"changing {where} leaves the key unchanged"


def test_the_structure_key_is_the_key_without_the_timesteps():
    base = rich_schedule()
    for where, s in single_changes(base):
        field = where.rsplit(".", 1)[1]
        if (field in Schedule.LABELS and where.count(".") == 1) or field == "t":
            assert s.structure_key() == base.structure_key(), where
        else:
            assert s.structure_key() != base.structure_key(), f"changing {where} leaves the structure key unchanged"


def test_the_key_survives_the_json_round_trip():
    s = rich_schedule()
    assert Schedule.from_json(s.to_json()).key() == s.key()
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))).key() == s.key()


def test_the_key_of_every_stored_schedule_is_the_key_its_database_holds():
    """Databases written before Schedule.key() existed hold the same keys, so de-duplication against their rows
    (sweeps, confirmations, resumed searches) still works."""
    with sqlite3.connect(f"file:{FIXTURE_DB}?mode=ro&immutable=1", uri=True) as conn:  # writes nothing beside it
        rows = conn.execute("SELECT key, schedule FROM trials").fetchall()
    assert len(rows) > 100
    for key, text in rows:
        assert Schedule.from_dict(json.loads(text)).key() == key


@pytest.mark.parametrize("label", Schedule.LABELS)
def test_labels_are_fields(label):
    assert label in {f.name for f in dataclasses.fields(Schedule)}


@pytest.mark.parametrize("t", [0.3, 0.0, -0.0, 1, 0.75])
def test_a_step_moved_to_another_time_is_what_replace_gives_it_field_for_field(t):
    """``Step.at`` (the searchers' cheap re-timing) gives the step ``dataclasses.replace`` gives: equal, and with
    the same key, which keeps 1 and 1.0 (and 0.0 and -0.0) apart."""
    base = rich_schedule()
    for st in base.steps:
        moved, replaced = st.at(t), dataclasses.replace(st, t=t)
        assert moved == replaced and repr(moved) == repr(replaced)
        a = Schedule(t_start=1.0, steps=(moved,), noise=base.noise)
        b = Schedule(t_start=1.0, steps=(replaced,), noise=base.noise)
        assert a.key() == b.key() and a.to_json() == b.to_json()
        for before in (0.3, 0.0, -0.0, 1, 1.0, 0.75):  # from a step already at a time, the same one or another
            start = dataclasses.replace(st, t=before)
            again = start.at(t)
            assert again == replaced and repr(again) == repr(replaced)
            c = Schedule(t_start=1.0, steps=(again,), noise=base.noise)
            assert c.key() == b.key() and c.to_json() == b.to_json()


def reference_key(s: Schedule, timed: bool = True) -> str:
    """The key as its docstring defines it: SHA-256 of the sorted, compact JSON of every field but the labels (the
    structure key: without the steps' times)."""
    core = {k: v for k, v in s.to_dict().items() if k not in ("schema", "version", "nfe", *Schedule.LABELS)}
    if not timed:
        core["steps"] = [{k: v for k, v in st.items() if k != "t"} for st in core["steps"]]
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def searched_schedules(n: int = 300):
    """Schedules as a searcher makes them: random ones, mutants, re-timed and crossed children."""
    space = DecisionSpace(noise.get("ddpm-linear"), 0.999, 0.001)  # late starts and t = 0 ends too
    rng = np.random.default_rng(0)
    out = [s for s in (space.random(int(rng.integers(3, 11)), rng) for _ in range(n)) if s is not None]
    for a, b in zip(out[:n // 2], out[1:]):
        out += [c for c in (space.mutate(a, rng), space.mutate_times(a, rng), space.crossover(a, b, rng))
                if c is not None]
    return out


def test_the_key_is_the_digest_of_the_identity_json_for_every_kind_of_schedule():
    """Keys are written from per-step texts kept on the steps; they must be the digest of the JSON form byte for
    byte, for changed fields, integer and negative-zero times, and every decision searchers make."""
    base = rich_schedule()
    odd = [dataclasses.replace(base, steps=tuple(st.at(t) for st, t in zip(base.steps, (1, -0.0, 0)))),
           dataclasses.replace(base, t_start=2, conventions={"b": [1, 2.5], "a": {"z": None, "é": "ü"}})]
    schedules = [base, *(s for _, s in single_changes(base)), *odd, *searched_schedules()]
    assert len(schedules) > 400
    for s in schedules:
        assert s.key() == reference_key(s), s
        assert s.structure_key() == reference_key(s, timed=False), s


def test_the_json_text_storage_keeps_is_the_sorted_compact_json_form_for_every_kind_of_schedule():
    """Storage writes a schedule as the text of Schedule.json_text_and_key() (from the per-step texts keys are written
    from): it must be the JSON of its to_dict(), keys sorted, byte for byte, whatever the fields, labels and times
    hold, and the key beside it the reference key."""
    base = rich_schedule()
    odd = [dataclasses.replace(base, steps=tuple(st.at(t) for st, t in zip(base.steps, (1, -0.0, 0)))),
           dataclasses.replace(base, t_start=2, name="é", meta={"b": [1, 2.5], "a": {"z": None, "é": "ü"}})]
    schedules = [base, *(s for _, s in single_changes(base)), *odd, *searched_schedules()]
    for s in schedules:
        text, key = s.json_text_and_key()
        assert text == json.dumps(s.to_dict(), sort_keys=True, separators=(",", ":")), s
        assert key == reference_key(s), s


@pytest.mark.parametrize("value", ["none", "", "a b", 'say "hi"', "back\\slash", "tab\there", "é", "\x7f",
                                   "\u2028", {}, {"kind": "vp-linear", "T": 1.0, "t_min": 0.001}, {"b": [1, 2.5]},
                                   {"a": {"z": None, "é": "ü"}}, 0.5, -0.0, 1e-300, 1, True, None, [1, "x"]])
def test_a_field_is_written_as_the_json_encoder_writes_it(value):
    """The texts keys are written from take shortcuts for words, empty mappings, floats and a noise dict seen
    before: each must be the JSON encoder's text, the first time and again."""
    from steptune.space.schedule import _ENCODER, _value_text

    assert _value_text(value) == _value_text(value) == _ENCODER.encode(value)


def test_a_noise_dict_changed_in_place_gets_a_new_key():
    """A noise dict's text is kept by the dict, checked against a copy of it: changed in place (which a frozen
    schedule does not prevent), the schedule's key follows the change."""
    s = rich_schedule()
    before = s.key()
    s.noise["beta_1"] = 19.0
    assert s.key() != before and s.key() == reference_key(s)
    s.noise["beta_1"] = noise.get("vp-linear").to_dict()["beta_1"]
    assert s.key() == before


def test_evolve_is_dataclasses_replace():
    base = rich_schedule()
    st = base.steps[1]
    for obj in (base, st, st.corrector):
        for f in dataclasses.fields(obj):
            v = other_value(getattr(obj, f.name)) if f.name != "steps" else base.steps[:1]
            if v is None:
                continue
            a, b = evolve(obj, **{f.name: v}), dataclasses.replace(obj, **{f.name: v})
            assert a == b and repr(a) == repr(b) and type(a) is type(b)
    with pytest.raises(TypeError, match="no field 'tt'"):
        evolve(st, tt=0.5)


def test_what_a_step_keeps_about_its_decisions_follows_them():
    """A re-timed step keeps its decisions' text and check; a step with other decisions gets its own."""
    st = Step(t=0.5, order=2, relaxation="linear", relaxation_coef=0.25)
    assert st.decisions_problem is None and '"order":2' in st.decisions_text
    moved = st.at(0.25)
    assert moved.decisions_text == st.decisions_text and moved.decisions_problem is None
    bad = evolve(st, order=1)  # a relaxation on an order-1 step
    assert '"order":1' in bad.decisions_text and "order-1 step" in bad.decisions_problem
    s = Schedule(t_start=1.0, steps=(Step(t=0.75), bad.at(0.25)))
    with pytest.raises(ScheduleError, match="step 1: field 'relaxation' scales the first derivative"):
        s.validate()
    assert Schedule(t_start=1.0, steps=(Step(t=0.75), moved)).key() == reference_key(
        Schedule(t_start=1.0, steps=(Step(t=0.75), moved)))
