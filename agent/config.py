"""TOML configuration: load, substitute ``${env:NAME}``, decode into typed configs, validate.

The model is the OpenTelemetry Collector's: ``receivers``, ``processors``,
``connectors``, ``exporters`` tables keyed by component id (``type`` or
``type/name``) and ``service.pipelines.<signal>[/<name>]`` wiring them.

Every error is collected with its key path (``exporters.otlp/up.endpoint: ...``) and
reported together; unknown keys are errors with a "did you mean". Decoding is pure:
no file or network I/O beyond reading the config file itself. ``mlagent validate``
and start-up call the same ``load_config``.

Component configs are dataclasses; their field types say how values are parsed:
``Duration`` ("60s" -> 60.0 seconds), ``ByteSize`` ("64MiB" -> bytes), ``Endpoint``
("host:port"), ``Literal[...]``, ``list[...]``, ``dict[str, ...]``, ``X | None``,
nested dataclasses. A dataclass may define ``validate(self) -> list[str]`` for
cross-field rules, each error ``"key: message"`` relative to the dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from agent.component import Factory, Kind, Signal

# ----------------------------------------------------------------------------- value types


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_DURATION = _Marker("duration")
_BYTESIZE = _Marker("bytesize")
_ENDPOINT = _Marker("endpoint")

Duration = Annotated[float, _DURATION]
"""Seconds. Written as ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h30m"`` or a number of seconds."""
ByteSize = Annotated[int, _BYTESIZE]
"""Bytes. Written as ``"64MiB"``, ``"1GB"``, ``"512KiB"`` or an integer."""
Endpoint = Annotated[str, _ENDPOINT]
"""``host:port`` (``[::1]:4317`` for IPv6)."""

_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
              "d": 86400.0}
_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_ENDPOINT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})$")


def parse_duration(value: Any) -> float:
    """``"1m30s"`` -> 90.0. Raises ``ValueError`` with a message fit for a user."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use \"10s\", \"500ms\", \"5m\")")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (use \"10s\", \"500ms\", \"5m\")")
    s = value.strip()
    pos, total = 0, 0.0
    for m in _DUR_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"{value!r} is not a duration (use \"10s\", \"500ms\", \"5m\")")
    return total


def parse_bytesize(value: Any) -> int:
    """``"64MiB"`` -> 67108864."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use \"64MiB\", \"1GB\", or bytes)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"{value!r} is not a size (use \"64MiB\", \"1GB\", or bytes)")


def parse_endpoint(value: Any) -> str:
    if not isinstance(value, str) or not _ENDPOINT_RE.match(value):
        raise ValueError(f"{value!r} is not host:port")
    port = int(value.rsplit(":", 1)[1])
    if port > 65535:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return value


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"127.0.0.1:4317"`` -> ``("127.0.0.1", 4317)``; ``"[::1]:80"`` -> ``("::1", 80)``."""
    host, port = endpoint.rsplit(":", 1)
    return host.strip("[]") or "0.0.0.0", int(port)


# ----------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """All problems found in a config, each ``"path: message"``."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(f"  {e}" for e in errors))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return str(get_args(tp)[1])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- decoding


def decode(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Decode a TOML value into ``tp``, appending ``"path: message"`` errors."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, marker = get_args(tp)[0], get_args(tp)[1]
        parser = {_DURATION: parse_duration, _BYTESIZE: parse_bytesize,
                  _ENDPOINT: parse_endpoint}.get(marker)
        if parser is None:
            return decode(base, value, path, errors)
        try:
            return parser(value)
        except ValueError as e:
            errors.append(f"{path}: {e}")
            return None
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return decode(args[0], value, path, errors)
        for a in args:  # first that decodes cleanly wins
            trial: list[str] = []
            out = decode(a, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            errors.append(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
                          + (_did_you_mean(value, map(str, allowed)) if isinstance(value, str) else ""))
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = get_args(tp)[:1]
        return [decode(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a table, got {value!r}")
            return {}
        _, val_tp = get_args(tp)
        return {k: decode(val_tp, v, _join(path, k), errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode_dataclass(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a path string, got {value!r}")
            return value
        return Path(value).expanduser()
    return value


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def decode_dataclass(cls: Any, raw: Any, path: str, errors: list[str], base: Any = None) -> Any:
    """Build ``cls`` from a TOML table: defaults for missing keys, errors for unknown ones.

    Missing keys take the values of ``base`` when given. A nested table starts from its
    field's own default, so ``sending_queue.persistent = false`` keeps the other
    queue settings an exporter chose as its defaults.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(f"{path or '(top level)'}: expected a table, got {raw!r}")
        return cls() if base is None else base
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = ({} if base is None else
                              {n: getattr(base, n) for n in fields})
    for key, value in raw.items():
        name = key.replace("-", "_")
        if keyword.iskeyword(name):  # `for = "5m"` fills the field `for_`
            name += "_"
        if name not in fields:
            known = [f.rstrip("_") if keyword.iskeyword(f.rstrip("_")) else f for f in fields]
            errors.append(f"{_join(path, key)}: unknown key{_did_you_mean(key, known)}")
            continue
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            kwargs[name] = decode_dataclass(type(default), value, _join(path, key), errors,
                                            base=default)
        else:
            kwargs[name] = decode(hints[name], value, _join(path, key), errors)
    try:
        obj = cls(**{k: v for k, v in kwargs.items() if v is not None})
    except (TypeError, ValueError) as e:
        errors.append(f"{path}: {e}")
        return cls()
    validate = getattr(obj, "validate", None)
    if callable(validate) and not any(e.startswith(path) for e in errors if path):
        for err in validate() or ():
            errors.append(_join(path, err) if path else err)
    return obj


# ----------------------------------------------------------------------------- env substitution

_ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(tree: Any, env: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Replace ``${env:NAME}`` / ``${env:NAME:-default}`` in every string value."""
    if isinstance(tree, dict):
        return {k: substitute_env(v, env, _join(path, k), errors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute_env(v, env, f"{path}[{i}]", errors) for i, v in enumerate(tree)]
    if isinstance(tree, str) and "${" in tree:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set")
            return ""
        return _ENV_RE.sub(repl, tree)
    return tree


# ----------------------------------------------------------------------------- the agent config


@dataclass
class HealthConfig:
    """``service.health``: the health and self-metrics endpoint."""

    endpoint: Endpoint = "127.0.0.1:13133"
    enabled: bool = True


@dataclass
class TelemetryConfig:
    """``service.telemetry``: the agent's own logs."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"


@dataclass
class PipelineConfig:
    """``service.pipelines.<signal>[/<name>]``."""

    receivers: list[str] = field(default_factory=list)
    processors: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)


@dataclass
class ServiceConfig:
    """``[service]``."""

    state_dir: Path | None = None
    shutdown_timeout: Duration = 10.0
    # WATCHDOG=1 is withheld when no component has moved data and the graph reports
    # a stuck component for this long (see service.py).
    watchdog_stall: Duration = 60.0
    health: HealthConfig = field(default_factory=HealthConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)


@dataclass
class ComponentConfig:
    """One configured component: its id, kind, factory and decoded config."""

    id: str
    kind: Kind
    factory: Factory
    config: Any

    @property
    def type(self) -> str:
        return self.id.split("/", 1)[0]


@dataclass
class AgentConfig:
    """A fully decoded and validated configuration."""

    service: ServiceConfig
    components: dict[str, ComponentConfig]  # keyed by "<kind>s.<id>" section path
    pipelines: dict[str, tuple[Signal, PipelineConfig]]
    source: str = "config"

    def component(self, section: str, cid: str) -> ComponentConfig:
        return self.components[f"{section}.{cid}"]


SECTIONS: dict[str, Kind] = {
    "receivers": Kind.RECEIVER,
    "processors": Kind.PROCESSOR,
    "exporters": Kind.EXPORTER,
    "connectors": Kind.CONNECTOR,
}
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?$")


def load_config_file(path: str | os.PathLike[str], registry: Mapping[Kind, Mapping[str, Factory]],
                     env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate a config file. Raises ``ConfigError`` with every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e.strerror or e}"], str(p)) from None
    return load_config(text, registry, env=env, source=str(p))


def load_config(text: str, registry: Mapping[Kind, Mapping[str, Factory]],
                env: Mapping[str, str] | None = None, source: str = "config") -> AgentConfig:
    """Parse TOML text into an ``AgentConfig``. Raises ``ConfigError`` with every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML syntax error: {e}"], source) from None
    errors: list[str] = []
    raw = substitute_env(raw, os.environ if env is None else env, "", errors)

    for key in raw:
        if key not in SECTIONS and key != "service":
            errors.append(f"{key}: unknown section{_did_you_mean(key, [*SECTIONS, 'service'])}")

    components: dict[str, ComponentConfig] = {}
    for section, kind in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            errors.append(f"{section}: expected a table of components")
            continue
        factories = registry.get(kind, {})
        for cid, body in table.items():
            cpath = f"{section}.{cid}"
            if not _ID_RE.match(cid):
                errors.append(f"{cpath}: component id must be 'type' or 'type/name' "
                              "(lowercase type)")
                continue
            ctype = cid.split("/", 1)[0]
            factory = factories.get(ctype)
            if factory is None:
                errors.append(f"{cpath}: unknown {kind} type {ctype!r}"
                              + _did_you_mean(ctype, factories) +
                              f"; known: {', '.join(sorted(factories)) or 'none'}")
                continue
            cfg = decode_dataclass(factory.config_class, body, cpath, errors)
            components[cpath] = ComponentConfig(cid, kind, factory, cfg)

    service = decode_dataclass(ServiceConfig, raw.get("service", {}), "service", errors)
    pipelines = _check_pipelines(service, components, errors)

    if errors:
        raise ConfigError(errors, source)
    return AgentConfig(service=service, components=components, pipelines=pipelines, source=source)


def _check_pipelines(service: ServiceConfig, components: dict[str, ComponentConfig],
                     errors: list[str]) -> dict[str, tuple[Signal, PipelineConfig]]:
    """Wiring rules: defined ids, signal support, connectors used on both sides, no unused."""
    pipelines: dict[str, tuple[Signal, PipelineConfig]] = {}
    used: set[str] = set()
    connector_as_exporter: dict[str, set[Signal]] = {}
    connector_as_receiver: dict[str, set[Signal]] = {}
    if not service.pipelines:
        errors.append("service.pipelines: at least one pipeline is required")
    for pid, pipe in service.pipelines.items():
        ppath = f"service.pipelines.{pid}"
        sig_name = pid.split("/", 1)[0]
        try:
            signal = Signal(sig_name)
        except ValueError:
            errors.append(f"{ppath}: pipeline id must start with traces, metrics or logs"
                          + _did_you_mean(sig_name, [s.value for s in Signal]))
            continue
        pipelines[pid] = (signal, pipe)
        if not pipe.receivers:
            errors.append(f"{ppath}.receivers: a pipeline needs at least one receiver")
        if not pipe.exporters:
            errors.append(f"{ppath}.exporters: a pipeline needs at least one exporter")
        for role, ids in (("receivers", pipe.receivers), ("processors", pipe.processors),
                          ("exporters", pipe.exporters)):
            seen: set[str] = set()
            for i, cid in enumerate(ids):
                ipath = f"{ppath}.{role}[{i}]"
                if cid in seen:
                    errors.append(f"{ipath}: {cid!r} is listed twice")
                    continue
                seen.add(cid)
                section = role
                cc = components.get(f"{role}.{cid}")
                if cc is None and role != "processors":
                    cc = components.get(f"connectors.{cid}")
                    section = "connectors"
                if cc is None:
                    defined = [k.split(".", 1)[1] for k in components
                               if k.startswith((role + ".", "connectors."))]
                    errors.append(f"{ipath}: {cid!r} is not defined in [{role}]"
                                  + ("" if role == "processors" else " or [connectors]")
                                  + _did_you_mean(cid, defined))
                    continue
                used.add(f"{section}.{cid}")
                f = cc.factory
                if section == "connectors":
                    if role == "exporters":
                        connector_as_exporter.setdefault(cid, set()).add(signal)
                        ok = signal in f.signals
                    else:
                        connector_as_receiver.setdefault(cid, set()).add(signal)
                        ok = signal in f.output_signals
                else:
                    ok = signal in f.signals
                if not ok:
                    supported = f.output_signals if (section == "connectors"
                                                     and role == "receivers") else f.signals
                    errors.append(f"{ipath}: {cid!r} does not support {signal} as a "
                                  f"{role[:-1]} (supports: "
                                  f"{', '.join(sorted(supported)) or 'nothing'})")
    for cid in sorted(set(connector_as_exporter) | set(connector_as_receiver)):
        if cid not in connector_as_exporter:
            errors.append(f"connectors.{cid}: used as a receiver but no pipeline exports to it")
        elif cid not in connector_as_receiver:
            errors.append(f"connectors.{cid}: used as an exporter but no pipeline receives "
                          "from it")
    _check_cycles(pipelines, set(connector_as_exporter) & set(connector_as_receiver), errors)
    for key in components:
        if key not in used:
            errors.append(f"{key}: defined but not used in any pipeline")
    return pipelines


def _check_cycles(pipelines: dict[str, tuple[Signal, PipelineConfig]], connectors: set[str],
                  errors: list[str]) -> None:
    """Pipelines joined through connectors must not loop back on themselves."""
    edges: dict[str, set[str]] = {pid: set() for pid in pipelines}
    for pid, (_, p) in pipelines.items():
        for cid in set(p.exporters) & connectors:
            edges[pid] |= {q for q, (_, qp) in pipelines.items() if cid in qp.receivers}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(pid: str, trail: list[str]) -> None:
        state[pid] = 1
        for q in sorted(edges[pid]):
            if state.get(q) == 1:
                loop = [*trail[trail.index(q):], q] if q in trail else [pid, q]
                errors.append(f"service.pipelines: connectors form a cycle: {' -> '.join(loop)}")
            elif q not in state:
                visit(q, [*trail, q])
        state[pid] = 2

    for pid in sorted(pipelines):
        if pid not in state:
            visit(pid, [pid])
