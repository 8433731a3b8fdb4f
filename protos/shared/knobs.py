"""One declaration per knob: a config dataclass field made with `knob(default, help, check=...)`
carries its default, help text, choices and check. From it come

- the command-line flag (`add_flags`): `--kv-cache-mb` for `kv_cache_mb`, typed from the
  annotation; a bool defaulting to False is `--x`, one defaulting to True is `--no-x`;
- the environment default (`from_args`): `<PREFIX>_KV_CACHE_MB`, e.g. LLAMADIST_STAGE_KV_CACHE_MB;
  a flag given on the command line beats it;
- the checks (`check_knobs`, called from the dataclass's `__post_init__`), so that Python callers
  constructing a config get the same refusals as the command line, each naming the flag.

Also the knobs every llamadist service shares (`ServiceConfig`: model, address, grace period,
worker threads, TLS), declared once here. No torch in this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from protos.errors import LlamadistError
from protos.shared.default_model import default_model_dir
from protos.shared.knob_checks import (
    Check,
    in_range,
    model_dir_or_none,
    non_empty,
    non_negative,
    positive,
    readable_file,
)
from protos.shared.security import check_tls_flags

REQUIRED: Any = MISSING  # knob(REQUIRED, ...): no default, the caller must give it
GIVEN = "_knobs_given"  # namespace attribute: the dests given on the command line

# A check returns None when the value is fine, else what is wrong ("must be positive, got 0");
# it may also raise ValueError (or a LlamadistError) whose message says what is wrong. Whatever
# else it returns is ignored, so a parser that returns a value or raises serves as a check.


class ConfigError(ValueError):
    """A knob's value is refused; the message names the flag (and the environment variable when
    the value came from there)."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name  # the field, "" for a check across fields


@dataclass(frozen=True)
class Knob:
    help: str
    choices: tuple | None = None
    check: Check | None = None
    parse: Callable[[str], Any] | None = None  # command-line/env text -> value (else the type)
    flag: str | bool | None = None  # None: derived from the name; False: Python only
    metavar: str | None = None


def knob(
    default: Any = REQUIRED,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    choices: Iterable | None = None,
    check: Check | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | bool | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is a knob: `port: int = knob(0, "port to listen on", check=...)`."""
    if not help:
        raise TypeError("every knob needs a help text")
    meta = {"knob": Knob(help, tuple(choices) if choices else None, check, parse, flag, metavar)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _default_model_dir() -> str:
    return str(default_model_dir())


# ---------------------------------------------------------------------- the shared knobs


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """The knobs of every llamadist service. A service's config subclasses it; a knob whose
    default differs per service is re-declared there with `ServiceConfig.knob_default`."""

    model: str = knob(
        default_factory=_default_model_dir,
        help="HF-layout model directory (config.json, *.safetensors, tokenizer files); a stage "
        "also takes a submodel (`llamadist model split`), or '' with --fetch-weights",
        check=model_dir_or_none,
        metavar="DIR",
    )
    host: str = knob("127.0.0.1", "address to listen on", check=non_empty)
    port: int = knob(0, "port to listen on (0 = any free one, printed)", check=in_range(0, 65535))
    grace_s: float = knob(
        10.0,
        "on SIGTERM: stop taking work, let calls in flight finish this long, exit 0",
        check=non_negative,
    )
    max_workers: int = knob(128, "gRPC worker threads (calls served at once)", check=positive)
    log_format: str = knob(
        "text", "logs as text lines, or json: one JSON object per line", choices=("text", "json")
    )
    hop: str = knob(
        default_factory=lambda: os.environ.get("LLAMADIST_HOP", "socket"),
        help="the per-token step links to stages: socket (the stages' hop socket, "
        "protos/shared/hop.py; a stage without one is linked over gRPC) or grpc (the "
        "ForwardStream RPC; a stage then opens no hop socket). LLAMADIST_HOP sets it for "
        "every service",
        choices=("socket", "grpc"),
    )
    tls_cert: str = knob(
        "", "this service's certificate (PEM): TLS on", check=readable_file, metavar="PEM"
    )
    tls_key: str = knob("", "its private key (PEM)", check=readable_file, metavar="PEM")
    tls_ca: str = knob(
        "",
        "CA certificate (PEM) that must have signed the peers' certificates; "
        "--tls-cert, --tls-key and --tls-ca go together",
        check=readable_file,
        metavar="PEM",
    )

    def __post_init__(self) -> None:
        check_knobs(self)
        check_tls_flags(self.tls_cert, self.tls_key, self.tls_ca)
        if not self.model and self.needs_model:
            raise ConfigError(f"--model: give a model directory{self.no_model_hint}", "model")

    needs_model = True  # a service that can run without a model directory says when
    no_model_hint = ""

    @classmethod
    def knob_default(
        cls, name: str, default: Any = MISSING, default_factory: Callable | None = None
    ) -> Any:
        """The knob `name` of this class (help, checks) with another default."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if default_factory is not None:
            return dataclasses.field(default_factory=default_factory, metadata=f.metadata)
        return dataclasses.field(default=default, metadata=f.metadata)


# ---------------------------------------------------------------------- reading the declarations


def knobs(cls: type) -> list[tuple[dataclasses.Field, Knob]]:
    """The knob fields of a config dataclass, in declaration order."""
    return [(f, f.metadata["knob"]) for f in dataclasses.fields(cls) if "knob" in f.metadata]


def flag_of(f: dataclasses.Field, k: Knob) -> str | None:
    """The command-line flag of a knob (None: not a flag)."""
    if k.flag is False:
        return None
    if isinstance(k.flag, str):
        return k.flag
    name = f.name.replace("_", "-")
    return f"--no-{name}" if default_of(f) is True else f"--{name}"


def env_of(f: dataclasses.Field, prefix: str) -> str:
    return f"{prefix}_{f.name.upper()}"


def default_of(f: dataclasses.Field) -> Any:
    """The field's default (made now for a default factory); REQUIRED when there is none."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def default(cls: type, name: str) -> Any:
    """The default of knob `name` of config class `cls`."""
    return default_of(next(f for f, _ in knobs(cls) if f.name == name))


def _type_of(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    return typing.get_origin(hint) or hint


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return "''" if value == "" else str(value)


def check_knobs(config: object) -> None:
    """Every knob's choices and check, in declaration order; the first refusal raises a
    ConfigError naming the flag."""
    for f, k in knobs(type(config)):
        value = getattr(config, f.name)
        flag = flag_of(f, k) or f.name
        if k.choices is not None and value not in k.choices:
            choices = ", ".join(show(c) for c in k.choices)
            raise ConfigError(f"{flag} must be one of {choices}, got {show(value)}", f.name)
        if k.check is None:
            continue
        if problem := _run_check(k.check, value):
            raise ConfigError(_refusal(flag, problem), f.name)


def _refusal(flag: str, problem: str) -> str:
    return f"{flag}{problem}" if problem.startswith(":") else f"{flag} {problem}"


def _run_check(check: Check, value: Any) -> str | None:
    try:
        problem = check(value)
        return problem if type(problem) is str else None
    except (ValueError, LlamadistError) as err:  # e.g. a shared parser's refusal
        return f": {err}"  # the error says what is wrong with which value


def check_value(cls: type, name: str, value: Any) -> None:
    """One knob's checks on a value, for commands that pass it on (e.g. `up` to its stages)."""
    f, k = next((f, k) for f, k in knobs(cls) if f.name == name)
    if k.check is not None and (problem := _run_check(k.check, value)):
        raise ConfigError(_refusal(flag_of(f, k) or name, problem), name)


# ---------------------------------------------------------------------- command line and env


class _Store(argparse.Action):
    """Stores the value and notes that the flag was given (so that it beats the environment)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = set(getattr(namespace, GIVEN, ()))
        setattr(namespace, GIVEN, given | {self.dest})


def _text_parser(cls: type, f: dataclasses.Field, k: Knob) -> Callable[[str], Any]:
    """Command-line or environment text -> the field's value."""
    if k.parse is not None:
        return k.parse
    kind = _type_of(cls, f)
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str):
        return kind
    raise TypeError(f"knob {cls.__name__}.{f.name}: give parse= for a {kind.__name__} field")


def _parse_bool(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True}
    words |= {"0": False, "false": False, "no": False, "off": False}
    if text.strip().lower() not in words:
        raise ValueError(f"{text!r} is not a boolean (1/0, true/false, yes/no, on/off)")
    return words[text.strip().lower()]


def _argparse_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """int, float and str as they are (argparse says "invalid int value: 'abc'"); a knob's own
    parse with its message."""
    if convert in (int, float, str):
        return convert

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, LlamadistError) as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {err}") from None

    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, env_prefix: str) -> None:
    """One flag per knob of `cls`; its help shows the default, the choices and the environment
    variable that may give it instead."""
    for f, k in knobs(cls):
        flag = flag_of(f, k)
        if flag is None:
            continue
        default = default_of(f)
        env = env_of(f, env_prefix)
        notes = []
        if k.choices:
            notes.append("one of " + ", ".join(show(c) for c in k.choices))
        notes.append("required" if default is REQUIRED else f"default {show(default)}")
        notes.append(f"env {env}")
        help = f"{k.help} ({'; '.join(notes)})".replace("%", "%%")
        common = dict(dest=f.name, action=_Store, help=help)
        if _type_of(cls, f) is bool and k.parse is None:
            parser.add_argument(flag, nargs=0, const=not default, default=default, **common)
            continue
        convert = _text_parser(cls, f, k)
        parser.add_argument(
            flag,
            type=_argparse_type(convert),
            default=None if default is REQUIRED else default,
            metavar=k.metavar or ("|".join(show(c) for c in k.choices) if k.choices else None),
            **common,
        )


def from_args(
    cls: type, args: argparse.Namespace, env_prefix: str, env: Mapping[str, str] | None = None
) -> Any:
    """The frozen config from parsed flags; a knob not given on the command line comes from
    its environment variable, else its default. Refusals are ConfigErrors of one line."""
    env = os.environ if env is None else env
    given = getattr(args, GIVEN, set())
    values: dict[str, Any] = {}
    from_env: dict[str, str] = {}
    for f, k in knobs(cls):
        flag = flag_of(f, k)
        if flag is None:
            continue
        name = env_of(f, env_prefix)
        if f.name in given:
            values[f.name] = getattr(args, f.name)
        elif name in env:
            parse = _text_parser(cls, f, k)
            try:
                values[f.name] = parse(env[name])
            except (ValueError, LlamadistError) as err:
                detail = "" if parse in (int, float) else f": {err}"
                kind = _type_of(cls, f).__name__
                raise ConfigError(f"{name}={env[name]!r} is not a valid {kind}{detail}") from None
            from_env[f.name] = name
        elif default_of(f) is REQUIRED:
            raise ConfigError(f"{flag} is required (or set {name})", f.name)
    try:
        return cls(**values)
    except ConfigError as err:
        if err.name in from_env:
            raise ConfigError(f"{err} (from {from_env[err.name]})", err.name) from None
        raise


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """flag -> action of a parser, without -h/--help."""
    return {
        s: a
        for a in parser._actions
        for s in a.option_strings
        if not isinstance(a, argparse._HelpAction)
    }


def checked(kind: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """An argparse type for a flag that is not a config knob (a client command's): parsed by
    `kind`, refused by `check` with argparse's one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {getattr(kind, '__name__', 'value')} value: {text!r}"
            ) from None
        if problem := _run_check(check, value):
            raise argparse.ArgumentTypeError(problem.removeprefix(": "))
        return value

    return parse


def split_list(text: str) -> tuple[str, ...]:
    """'a,b, c' -> ('a', 'b', 'c'); empty items are dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
