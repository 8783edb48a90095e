"""Your own network as a problem: ``module:factory`` plus its conventions.

The factory is called without arguments and returns one of

* a ``Problem`` (used as it is),
* a ``Plug`` (or a dict with its fields): the network and whatever conventions it knows,
* a torch module or any callable ``fn(x, time, **kwargs)`` (a diffusers ``UNet2DModel`` /
  ``UNet2DConditionModel`` is recognised and wrapped; its sample shape comes from its config).

Conventions given to ``load_problem`` (the command line's ``--prediction``, ``--time-input``,
``--noise``, ...) override what the factory says. Before anything runs, the network is called on
two prior samples at the first, middle and last time: an import failure, a wrong output shape or
NaN/inf output is a one-line ``PluginError`` naming the factory.

Reference solutions for a plugged network come from ``neural_reference`` (a converged many-step
order-3 solve, cached on disk keyed by the network's weights, the conventions and the noise bank).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from steptune.space import Model
from steptune.space import noise as noise_mod
from steptune.space.model import network_output
from steptune.space.noise import NoiseSchedule

from .cache import hash_tensor
from .neural_reference import ReferenceSettings
from .problems import NeuralProblem, Problem, default_conventions
from .user_code import own_source_file

Tensor = torch.Tensor
DEFAULT_NOISE = "ddpm-linear"


class PluginError(ValueError):
    """A plugged model that cannot be used; the message names the factory."""


@dataclass
class Plug:
    """A network with the conventions its factory knows (None: not said; the defaults of the noise schedule
    apply). ``identity`` is extra JSON-able data that tells this network apart (e.g. a checkpoint hash);
    without it the weights of a torch module are hashed. ``decode(x)`` (optional) turns final states (n, *shape)
    into images (n, 1 or 3, H, W) in [0, 1] (e.g. a VAE decode for a latent model): with it the problem is an
    image problem, whose samples the sample grids show (``steptune eval --grid``, the dashboard, reports).
    ``time_differentiable``: the network is differentiable in its time input (a tensor; a diffusers UNet's sinusoidal
    embedding is), so refinement differentiates through it instead of by a forward difference in time."""

    network: Callable
    shape: tuple[int, ...] | None = None
    noise: str | NoiseSchedule | None = None
    prediction: str | None = None
    time_input: str | None = None
    time_scale: float | None = None
    guidance_scale: float | None = None
    cond_kwargs: dict = field(default_factory=dict)
    uncond_kwargs: dict = field(default_factory=dict)
    data_mean: Tensor | None = None
    name: str | None = None
    identity: dict = field(default_factory=dict)
    decode: Callable | None = None
    time_differentiable: bool = False


# ---- networks -------------------------------------------------------------------------------------

def _is_diffusers_unet(obj) -> bool:
    return type(obj).__module__.startswith("diffusers") and type(obj).__name__ in (
        "UNet2DModel", "UNet2DConditionModel")


def _module_dtype_device(network) -> tuple[torch.dtype | None, torch.device | None]:
    """The floating dtype holding most of a module's parameters and buffers, and their device."""
    tensors = [*network.parameters(), *network.buffers()]
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    dtype = max(sizes, key=sizes.get) if sizes else None
    return dtype, (tensors[0].device if tensors else None)


class TorchNetwork:
    """Calls a torch module (or callable) in its own dtype and device and returns the caller's dtype;
    a diffusers-style output object gives its ``.sample`` (a dict its ``"sample"``), a tuple its first entry.
    Keyword arguments whose batch is 1 are repeated to the batch of x (a single prompt embedding or label
    for all). The module's parameters are frozen (sampling never trains them; their gradients would only
    cost memory), and time goes in at least float32 (a half-precision timestep is off by up to 1 at 1000).
    The module's ``sample_kwargs(n)``, if it has one, is passed on (see ``space.batch``)."""

    def __init__(self, network: Callable, **fixed):
        self.network, self.fixed = network, fixed
        self.dtype, self.device = None, None
        if isinstance(network, torch.nn.Module):
            network.requires_grad_(False)
            self.dtype, self.device = _module_dtype_device(network)
        if callable(getattr(network, "sample_kwargs", None)):
            self.sample_kwargs = network.sample_kwargs

    def _to(self, v: Tensor, batch: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        if not isinstance(v, Tensor):
            return v
        if batch is not None and v.ndim > 0 and v.shape[0] == 1 and batch > 1:
            v = v.expand(batch, *v.shape[1:])
        if self.device is not None:
            v = v.to(self.device)
        dtype = self.dtype if dtype is None else dtype
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v

    def to(self, device) -> TorchNetwork:
        """The network on ``device``, in place."""
        if isinstance(self.network, torch.nn.Module):
            self.network.to(device)
            self.device = torch.device(device)
        return self

    def __call__(self, x: Tensor, time: Tensor, **kwargs) -> Tensor:
        b = x.shape[0]
        kw = {k: self._to(v, b) for k, v in {**self.fixed, **kwargs}.items()}
        time_dtype = None if self.dtype is None or self.dtype.itemsize >= 4 else torch.float32
        out = network_output(self.network(self._to(x), self._to(time, dtype=time_dtype), **kw))
        return out.to(x.dtype).to(x.device)


def DiffusersUNet(unet, **fixed) -> TorchNetwork:  # noqa: N802 (reads as the wrapper it builds)
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` as ``fn(x, time, **kwargs)``:
    ``unet(x, time, **fixed, **kwargs).sample`` (e.g. ``encoder_hidden_states=...``, ``class_labels=...``)."""
    if not _is_diffusers_unet(unet):
        raise TypeError(f"expected a diffusers UNet2DModel or UNet2DConditionModel, got {type(unet).__name__}")
    return TorchNetwork(unet, **fixed)


def _captured(fn) -> list:
    """The torch modules and tensors a plain callable holds: a function's closure and defaults, a
    partial's arguments, a bound method's object, a callable object's attributes (one level)."""
    if isinstance(fn, functools.partial):
        values = [fn.func, *fn.args, *fn.keywords.values()]
    elif hasattr(fn, "__code__"):
        values = [c.cell_contents for c in (fn.__closure__ or ()) if c.cell_contents is not None]
        values += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    elif hasattr(fn, "__self__"):
        values = [fn.__self__]
    else:
        values = list(getattr(fn, "__dict__", {}).values())
    return [v for v in values if isinstance(v, (torch.nn.Module, Tensor))]


def network_fingerprint(network) -> str:
    """sha256 over a torch module's parameters and buffers (names, shapes, values); for any other
    callable, its qualified name and the modules and tensors it holds (``_captured``)."""
    module = getattr(network, "network", network)
    h = hashlib.sha256()
    if isinstance(module, torch.nn.Module):
        state = module.state_dict()
        unsaved = {f"unsaved:{n}": b for n, b in module.named_buffers() if n not in state}
        for name, v in sorted({**state, **unsaved}.items()):
            hash_tensor(h, name, v)
        return h.hexdigest()
    name = f"{type(module).__module__}.{getattr(module, '__qualname__', type(module).__qualname__)}"
    held = _captured(module)
    for i, v in enumerate(held):
        if isinstance(v, Tensor):
            hash_tensor(h, str(i), v)
        else:
            h.update(network_fingerprint(v).encode())
    return f"{name}:{h.hexdigest()}" if held else name


def source_fingerprint(*objs) -> str | None:
    """sha256 over the user's own source files that define ``objs`` (a factory, its network: every submodule of a
    torch module, what a plain callable holds), or None where all of them come from installed code."""
    found = []
    for o in objs:
        for v in (o, *([] if isinstance(o, torch.nn.Module) else _captured(o))):
            found += list({type(m) for m in v.modules()}) if isinstance(v, torch.nn.Module) else [v]
    files = sorted({f for o in found if (f := own_source_file(o)) is not None})
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def conditioning_fingerprint(*kwargs: dict) -> str:
    """sha256 over conditioning arguments (tensors by value, anything else by its repr)."""
    h = hashlib.sha256()
    for k, kw in enumerate(kwargs):
        for name, v in sorted(kw.items()):
            if isinstance(v, Tensor):
                hash_tensor(h, f"{k}:{name}", v)
            else:
                h.update(f"{k}:{name}={v!r}".encode())
    return h.hexdigest()


# ---- factories ------------------------------------------------------------------------------------

def _here() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the folder was removed under the process: nothing to find there
        return None


def _importable_from_here() -> None:
    """Modules in the current folder can be named, as with ``python -m``: the folder goes at the end of the path, so
    that it shadows no installed package."""
    here = _here()
    if here is not None and "" not in sys.path and here not in sys.path:
        sys.path.append(here)


def import_factory(spec: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise PluginError(f"model {spec!r}: write it as module:factory (e.g. mypkg.models:load_unet)")
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module)
        named = ".".join((*path.parent.parts, path.stem)).lstrip(".") if not path.is_absolute() else path.stem
        top = path.parts[0] + "/" if len(path.parts) > 1 and not path.is_absolute() else path.name
        raise PluginError(f"model {spec!r}: name the module, not its file: {named}:{attr}, run from the folder that "
                          f"holds {top} (or with that folder on PYTHONPATH)")
    _importable_from_here()
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise PluginError(f"model {spec!r}: cannot import {module!r} ({type(e).__name__}: {e})") from None
        top = module.partition(".")[0]
        raise PluginError(f"model {spec!r}: cannot import {module!r}: there is no {e.name!r} in the current folder "
                          f"({_here()}) or on the Python path; run steptune from the folder that holds {top}/ "
                          f"or {top}.py, or add that folder to PYTHONPATH") from None
    except Exception as e:
        raise PluginError(f"model {spec!r}: cannot import {module!r} ({type(e).__name__}: {e})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            here = _here()
            mine = here is not None and (Path(here) / f"{module.replace('.', '/')}.py").is_file()
            found = getattr(mod, "__file__", None)
            shadowed = (f"; {module!r} was imported from {found}, not from your {module.replace('.', '/')}.py here: "
                        "a module of that name in Python's library or an installed package comes first, so rename "
                        "your file" if mine and found and Path(found).resolve().parent != Path(here).resolve() else "")
            raise PluginError(f"model {spec!r}: {module!r} has no attribute {attr!r}{shadowed}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"model {spec!r}: {attr!r} is not callable; it must be a factory function")
    return obj


def _as_plug(obj, spec: str) -> Plug | Problem:
    if isinstance(obj, (Problem, Plug)):
        return obj
    if isinstance(obj, dict):
        known = {f.name for f in fields(Plug)}
        bad = sorted(set(obj) - known)
        if bad or "network" not in obj:
            raise PluginError(f"model {spec!r}: the factory's dict needs 'network' and may only have "
                              f"{', '.join(sorted(known))} (got {', '.join(bad) or 'no network'})")
        return Plug(**obj)
    if callable(obj):
        return Plug(network=obj)
    raise PluginError(f"model {spec!r}: the factory returned {type(obj).__name__}; return a torch module, a "
                      "callable, a Plug or a Problem")


def _pick(given, said, default):
    return given if given is not None else (said if said is not None else default)


def plugin_problem(spec: str, *, noise: str | NoiseSchedule | None = None, prediction: str | None = None,
                   time_input: str | None = None, time_scale: float | None = None,
                   guidance_scale: float | None = None, shape: tuple[int, ...] | None = None,
                   t_start: float | None = None, t_end: float | None = None,
                   reference_tol: float | None = None, check: bool = True) -> Problem:
    """The problem of the network ``module:factory`` with its conventions (see the module docstring)."""
    factory = import_factory(spec)
    try:
        made = factory()
    except Exception as e:
        raise PluginError(f"model {spec!r}: the factory raised {type(e).__name__}: {e}") from None
    plug = _as_plug(made, spec)
    if isinstance(plug, Problem):
        given = [k for k, v in {"noise": noise, "prediction": prediction, "time_input": time_input,
                                "time_scale": time_scale, "guidance_scale": guidance_scale, "shape": shape}.items()
                 if v is not None]
        if given:
            raise PluginError(f"model {spec!r}: the factory returns a Problem, which fixes its own conventions; drop "
                              f"--{given[0].replace('_', '-')}")
        if check:
            check_problem(plug, spec)
        return plug
    net = plug.network
    guided = _pick(guidance_scale, plug.guidance_scale, None)
    if guided is not None and not (plug.cond_kwargs or plug.uncond_kwargs or hasattr(net, "sample_kwargs")):
        raise PluginError(f"model {spec!r}: guidance {guided:g} has nothing to guide between: the factory gives no "
                          "cond_kwargs and uncond_kwargs (and the network no sample_kwargs), so both calls would be "
                          "the same; return a Plug with them, or drop --guidance")
    ns = _pick(noise, plug.noise, DEFAULT_NOISE)
    try:
        ns = noise_mod.get(ns) if isinstance(ns, str) else ns
    except ValueError as e:
        raise PluginError(f"model {spec!r}: {e}") from None
    p_default, ti_default = default_conventions(ns)
    if _is_diffusers_unet(net):
        cfg = net.config
        size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        plug.shape = plug.shape or (cfg.in_channels, *size)
        net = DiffusersUNet(net)
    elif isinstance(net, torch.nn.Module):
        net = TorchNetwork(net)
    shape = _pick(shape, plug.shape, None)
    if shape is None:
        raise PluginError(f"model {spec!r}: the sample shape is unknown; give --shape 3,32,32 (shape = [3, 32, 32] "
                          "under [problem] in a job file) or return a Plug with shape=...")
    scale = _pick(time_scale, plug.time_scale, 1.0)
    takes = _pick(time_input, plug.time_input, ti_default)
    if time_scale is not None and takes != "continuous":
        raise PluginError(f"model {spec!r}: --time-scale scales a continuous time input, and this network takes "
                          f"{takes!r} time; drop it, or give --time-input continuous")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise PluginError(f"model {spec!r}: time_scale {scale!r} must be a positive number")
    try:
        model = Model(net, ns, prediction=_pick(prediction, plug.prediction, p_default),
                      time_input=_pick(time_input, plug.time_input, ti_default),
                      time_scale=float(scale),
                      guidance_scale=_pick(guidance_scale, plug.guidance_scale, None),
                      cond_kwargs=dict(plug.cond_kwargs), uncond_kwargs=dict(plug.uncond_kwargs),
                      data_mean=plug.data_mean, time_differentiable=bool(plug.time_differentiable))
        settings = ReferenceSettings() if reference_tol is None else ReferenceSettings(tol=float(reference_tol))
        source = {"kind": "network", "factory": spec, "network_sha256": network_fingerprint(plug.network),
                  **plug.identity}
        if plug.cond_kwargs or plug.uncond_kwargs:
            source["conditioning_sha256"] = conditioning_fingerprint(plug.cond_kwargs, plug.uncond_kwargs)
        if plug.decode is not None:
            if not callable(plug.decode):
                raise ValueError(f"decode must be a function of the states, got {type(plug.decode).__name__}")
            source["images"] = True  # a stored study says it can be shown as images without loading the factory
        prob = NeuralProblem(name=plug.name or spec, noise=ns, model=model, shape=tuple(shape), t_start=t_start,
                             t_end=t_end, source=source, reference_settings=settings, decode=plug.decode,
                             code_sha256=source_fingerprint(factory, plug.network))
    except ValueError as e:
        raise PluginError(f"model {spec!r}: {e}") from None
    if check:
        check_problem(prob, spec)
    return prob


def check_problem(problem: Problem, spec: str) -> None:
    """Call the model on two prior samples at the first, middle and last time; PluginError if it fails,
    returns another shape or gives NaN/inf."""
    x = problem.sample_prior(2, torch.Generator().manual_seed(0))
    model = problem.model
    with model.uncounted():
        for t in (problem.t_start, 0.5 * (problem.t_start + problem.t_end), problem.t_end):
            try:
                with torch.no_grad():
                    out = model.raw(x, t)
            except Exception as e:
                raise PluginError(f"model {spec!r}: calling it at t = {t:g} failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
            if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise PluginError(f"model {spec!r}: returned {got} for input shape {tuple(x.shape)}; it must return "
                                  "the shape of its input (check --shape and the network)")
            if not bool(torch.isfinite(out).all()):
                raise PluginError(f"model {spec!r}: produced NaN or inf at t = {t:g}; check the weights and the "
                                  "time input convention (--time-input)")
