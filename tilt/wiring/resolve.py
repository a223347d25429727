"""Resolve the configured methods' needs to providers, once per run. No method name appears here.

    methods   loss, advantage estimator, KL estimator (when a KL term or log pi_ref is used) and
              selector, each with its registry entry and configured keyword arguments
    needs     each method's declared inputs (``Entry.needs(kwargs)``) minus what the loop always
              has (``providers.INTRINSIC``); every remaining name must have a provider
    settings  a method's keyword arguments are split between its function, its providers'
              constructors and its state factory (registry meta ``state``), each validated against
              the annotated signature; a keyword of both the function and a provider is shared

An unmet need, an unknown keyword or a keyword of the wrong type is a ``ConfigError`` naming the
method and what to set.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

from tilt.advantages import ADVANTAGES
from tilt.config import Config, ConfigError
from tilt.corrections import CORRECTIONS
from tilt.kl import KL_ESTIMATORS
from tilt.losses import LOSSES
from tilt.registry import Entry
from tilt.selection import SELECTORS
from tilt.providers import INTRINSIC, PROVIDERS, Provider


@dataclass
class Method:
    """One configured method: registry entry, keyword arguments split by destination, inputs read."""

    axis: str  # "loss", "advantage", "kl", "selector" or "correction" (config section: SECTION[axis])
    entry: Entry
    kwargs: dict[str, Any]  # as configured
    fn_kwargs: dict[str, Any]  # those of the function itself
    needs: tuple[str, ...]  # every declared input, intrinsic ones included
    state: Any = None  # the method's own per-run state (meta "state"), built by ``resolve``

    @property
    def who(self) -> str:
        return f"{self.axis} {self.entry.name!r}"

    def bound(self) -> Callable:
        """The function with its configured keyword arguments."""
        return partial(self.entry.fn, **self.fn_kwargs) if self.fn_kwargs else self.entry.fn


@dataclass
class Plan:
    """What ``tilt.trainer.build`` needs from the resolution."""

    methods: dict[str, Method]
    providers: list[tuple[type[Provider], frozenset[str], dict[str, Any]]] = field(default_factory=list)

    def reads(self, axis: str) -> set[str]:
        """Inputs declared by the ``axis`` method (empty when it is not active)."""
        m = self.methods.get(axis)
        return set(m.needs) if m is not None else set()

    @property
    def resources(self) -> set[str]:
        """Run resources the providers require ("ref_model", "teacher")."""
        return {r for cls, _, _ in self.providers for r in cls.requires}


def keyword_params(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """Keyword-only parameters of ``fn`` (of ``__init__`` for a class) minus ``skip``."""
    params = inspect.signature(fn).parameters
    return {n: p for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in skip}


def check_types(kwargs: dict[str, Any], params: dict[str, inspect.Parameter], who: str, section: str) -> None:
    """Scalar keywords must have the annotated type (an int is a float; a bool is neither)."""
    for k, v in kwargs.items():
        if k not in params:
            continue
        want = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}.get(str(params[k].annotation))
        if want and (not isinstance(v, want) or (isinstance(v, bool) and bool not in want)):
            raise ConfigError(f"{section}.kwargs.{k}: {who!r} expects {want[-1].__name__}, got {v!r}")


def configured_methods(cfg: Config) -> list[tuple[str, Entry, dict[str, Any]]]:
    """(axis, entry, kwargs) of every active method. The KL estimator is active when a KL term is
    used (kl.beta > 0) or when the loss reads log pi_ref (then kl/mean is still logged)."""
    loss = LOSSES.entry(cfg.loss.name)
    out = [("loss", loss, cfg.loss.kwargs), ("advantage", ADVANTAGES.entry(cfg.advantage.name), cfg.advantage.kwargs)]
    if cfg.kl.beta > 0 or {"ref_logp", "ref_logits"} & set(loss.needs(cfg.loss.kwargs)):
        out.append(("kl", KL_ESTIMATORS.entry(cfg.kl.estimator), cfg.kl.kwargs))
    if cfg.selection.name != "none":
        out.append(("selector", SELECTORS.entry(cfg.selection.name), cfg.selection.kwargs))
    if cfg.correction.name != "none":
        out.append(("correction", CORRECTIONS.entry(cfg.correction.name), cfg.correction.kwargs))
    return out


SECTION = {"loss": "loss", "advantage": "advantage", "kl": "kl", "selector": "selection", "correction": "correction"}


def resolve(cfg: Config) -> Plan:
    """The configured methods, their providers (one per class, with merged settings) and state."""
    methods: dict[str, Method] = {}
    wanted: dict[type[Provider], tuple[set[str], list[Method]]] = {}
    for axis, entry, kwargs in configured_methods(cfg):
        needs = entry.needs(kwargs) + (("ref_logp",) if axis == "kl" else ())
        fn_params = keyword_params(entry.meta.get("kwargs_of", entry.fn), entry.meta.get("loop_args", ()))
        m = Method(axis, entry, dict(kwargs), {k: v for k, v in kwargs.items() if k in fn_params}, needs)
        methods[axis] = m
        for need in needs:
            if need in INTRINSIC[axis]:
                continue
            if need not in PROVIDERS:
                raise ConfigError(f"{m.who} needs {need!r}, which no provider supplies (providers: "
                                  f"{', '.join(PROVIDERS.names())}); register one with "
                                  f"tilt.providers.provides({need!r})")
            names, owners = wanted.setdefault(PROVIDERS.get(need), (set(), []))
            names.add(need)
            if m not in owners:
                owners.append(m)
    plan = Plan(methods)
    if "logits" in plan.reads("kl") and cfg.kl.placement == "reward":
        raise ConfigError(f"kl.estimator={cfg.kl.estimator!r} reads full logits and runs only with kl.placement='loss'")
    for cls, (names, owners) in wanted.items():
        cls.check(cfg, frozenset(names), owners[0].who)
        settings: dict[str, Any] = {}
        for m in owners:
            for k, v in shared_settings(cls, m).items():
                if k in settings and settings[k] != v:
                    raise ConfigError(f"provider of {sorted(names)} gets {k}={settings[k]!r} and {k}={v!r} from "
                                      f"two methods; set the same value in both")
                settings[k] = v
        plan.providers.append((cls, frozenset(names), settings))
    for m in methods.values():
        check_method_kwargs(m, [cls for cls, (_, owners) in wanted.items() if m in owners])
        factory = m.entry.meta.get("state")
        if factory is not None:
            try:
                m.state = factory(**shared_settings(factory, m))
            except ValueError as exc:
                raise ConfigError(f"{SECTION[m.axis]}.kwargs: {exc}") from None
    return plan


def shared_settings(factory: Callable, m: Method) -> dict[str, Any]:
    """Values of ``factory``'s keyword parameters from method ``m``: its configured keyword, else
    the default of the method's own keyword of that name (shared settings), else left out."""
    fn_params = keyword_params(m.entry.fn)
    out = {}
    for k in keyword_params(factory):
        if k in m.kwargs:
            out[k] = m.kwargs[k]
        elif k in fn_params and fn_params[k].default is not inspect.Parameter.empty:
            out[k] = fn_params[k].default
    return out


def check_method_kwargs(m: Method, providers: list[type]) -> None:
    """Every configured keyword belongs to the function, one of its providers or its state, with
    the annotated type; then the entry's own check (meta ``check``) runs on them."""
    section = SECTION[m.axis]
    fn_params = keyword_params(m.entry.meta.get("kwargs_of", m.entry.fn), m.entry.meta.get("loop_args", ()))
    owners = [fn_params] + [keyword_params(c) for c in providers]
    if m.entry.meta.get("state") is not None:
        owners.append(keyword_params(m.entry.meta["state"]))
    allowed = [k for params in owners for k in params if k not in ("logits", "ref_logits")]
    for k in m.kwargs:
        if not any(k in params for params in owners):
            raise ConfigError(f"{section}.kwargs: {m.who}: unknown keyword {k!r} (value {m.kwargs[k]!r}); "
                              f"allowed: {', '.join(dict.fromkeys(allowed)) or 'none'}")
    for params in owners:
        check_types(m.kwargs, params, m.entry.name, section)
    check: Optional[Callable] = m.entry.meta.get("check")
    if check is not None:
        accepted = inspect.signature(check).parameters
        try:
            check(**{k: v for k, v in m.kwargs.items() if k in accepted})
        except ValueError as exc:
            raise ConfigError(f"{section}.kwargs: {exc}") from None
