"""One declaration per knob: the `stage` and `orchestrator` flags, their defaults, help texts,
environment variables and checks all come from StageConfig and OrchestratorConfig, and the
README's usage lines agree with them. A knob added with one `knob(...)` line is walked here
without changing this file."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import build_parser, main
from orchestrator.config import ENV_PREFIX as ORCHESTRATOR_ENV
from orchestrator.config import OrchestratorConfig
from orchestrator.plan_spec import STRATEGIES
from protos.shared.knob_checks import positive
from protos.shared.knobs import (
    ConfigError,
    ServiceConfig,
    add_flags,
    default_of,
    flag_of,
    flags_of,
    from_args,
    knob,
    knobs,
)
from stage_service.config import DTYPES, StageConfig
from stage_service.config import ENV_PREFIX as STAGE_ENV

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {
    "stage": (StageConfig, STAGE_ENV),
    "orchestrator": (OrchestratorConfig, ORCHESTRATOR_ENV),
}


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def all_parsers(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()):
    """(command path, parser) of every command and subcommand."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, (*path, name))


@pytest.fixture
def model(tmp_path) -> str:
    (tmp_path / "config.json").write_text("{}")  # a model directory as far as the checks go
    return str(tmp_path)


# ---------------------------------------------------------------------- one declaration


@pytest.mark.parametrize("command", SERVICES)
def test_every_flag_is_a_knob_and_every_knob_a_flag(command):
    cls, _ = SERVICES[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    declared = {f.name: (f, k) for f, k in knobs(cls)}
    assert set(fields) == set(declared), f"fields that are not knobs: {set(fields) - set(declared)}"
    actions = {a.dest: a for a in subparser(command)._actions if a.dest != "help"}
    for dest, action in actions.items():
        assert dest in fields, f"{command} {action.option_strings} has no field in {cls.__name__}"
        f, k = declared[dest]
        assert action.option_strings == [flag_of(f, k)], (dest, action.option_strings)
    for name, (f, k) in declared.items():
        if flag_of(f, k) is not None:  # flag=False marks a Python-only knob
            assert name in actions, f"{cls.__name__}.{name} has no {command} flag"


@pytest.mark.parametrize("command", SERVICES)
def test_one_default_per_knob(command):
    """The flag's default is the field's (the drift this guards against: --grace-s was 10 in the
    command line and 5 in both dataclasses, the orchestrator's --port 50051 against 0)."""
    cls, _ = SERVICES[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in subparser(command)._actions:
        if action.dest == "help":
            continue
        default = default_of(fields[action.dest])
        if default is dataclasses.MISSING:
            assert action.default is None, action.dest
        else:
            assert action.default == default, (command, action.dest, action.default, default)


def test_a_knob_is_declared_in_one_place():
    """A field both services have is ServiceConfig's (the same declaration, maybe another
    default); one service's knob is declared in its config only; no flag appears twice."""
    shared = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    stage = {f.name: f for f in dataclasses.fields(StageConfig)}
    orch = {f.name: f for f in dataclasses.fields(OrchestratorConfig)}
    for name in stage.keys() & orch.keys():
        assert name in shared, f"{name} is declared in both configs: declare it in ServiceConfig"
        for cls_fields in (stage, orch):
            assert cls_fields[name].metadata["knob"] is shared[name].metadata["knob"], name
    for command in SERVICES:
        strings = [s for a in subparser(command)._actions for s in a.option_strings]
        assert len(strings) == len(set(strings)), command
        dests = [a.dest for a in subparser(command)._actions]
        assert len(dests) == len(set(dests)), command


def test_the_shared_defaults_resolved():
    """What the two declarations had drifted on, now one value each."""
    assert StageConfig.__dataclass_fields__["grace_s"].default == 10.0
    assert OrchestratorConfig.__dataclass_fields__["grace_s"].default == 10.0
    assert OrchestratorConfig.__dataclass_fields__["port"].default == 50051
    assert StageConfig.__dataclass_fields__["port"].default == 0


@pytest.mark.parametrize("command", SERVICES)
def test_help_shows_every_declared_help_text(command, capsys):
    cls, env = SERVICES[command]
    assert main([command, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for f, k in knobs(cls):
        assert len(k.help) > 10, f"{cls.__name__}.{f.name} needs a help text"
        assert " ".join(k.help.split()) in shown, f.name
        assert f"{env}_{f.name.upper()}" in shown.replace(" ", ""), f.name


def test_strategy_names_come_from_the_enum(model):
    orch = flags_of(subparser("orchestrator"))["--strategy"]
    assert orch.metavar == "|".join(STRATEGIES)
    for command in ("preview", "reload"):
        assert tuple(flags_of(subparser("plan", command))["--strategy"].choices) == STRATEGIES
    with pytest.raises(ConfigError, match="--strategy: unknown strategy 'fastest'; choose one of"):
        OrchestratorConfig(stages=("a:1",), strategy="fastest", model=model)


def test_dtype_choices_are_the_codecs():
    from protos.codec import DTYPE_NAMES

    assert set(DTYPES) == set(DTYPE_NAMES)


# ---------------------------------------------------------------------- checks


def test_checks_name_the_flag_for_python_callers_too(model):
    with pytest.raises(ConfigError, match=r"^--port must be 0\.\.65535, got 99999$"):
        StageConfig(model=model, port=99999)
    with pytest.raises(ConfigError, match="^--host must not be empty"):
        OrchestratorConfig(model=model, stages=("a:1",), host=" ")
    with pytest.raises(ConfigError, match="^--kv-cache-mb must be positive, got 0"):
        StageConfig(model=model, kv_cache_mb=0)
    with pytest.raises(ConfigError, match="^--static-kv must be one of auto, on, off, got sure"):
        StageConfig(model=model, static_kv="sure")
    with pytest.raises(ConfigError, match="^--stages 'a' is not host:port"):
        OrchestratorConfig(model=model, stages=("a:1+a",))
    with pytest.raises(ConfigError, match="^--model /nonexistent does not exist.*fetch-default"):
        StageConfig(model="/nonexistent")
    with pytest.raises(ConfigError, match="has no config.json.*llamadist model fetch-default"):
        StageConfig(model=str(ROOT / "tests"))
    with pytest.raises(ConfigError, match="^--tls-cert /nonexistent.pem: no such file"):
        StageConfig(model=model, tls_cert="/nonexistent.pem")
    with pytest.raises(ConfigError, match="^--strategy custom: the custom strategy needs"):
        OrchestratorConfig(model=model, stages=("a:1",), strategy="custom")
    assert OrchestratorConfig(model=model, stages=("a:1", "b:2+c:3")).port == 50051


def test_port_99999_is_refused_on_the_command_line(model, capsys):
    assert main(["stage", "--model", model, "--port", "99999"]) == 2
    assert capsys.readouterr().err == "llamadist: error: --port must be 0..65535, got 99999\n"


# ---------------------------------------------------------------------- environment


def parse(command: str, argv: list[str], env: dict[str, str]):
    cls, prefix = SERVICES[command]
    return from_args(cls, subparser(command).parse_args(argv), prefix, env)


def test_environment_gives_defaults_and_a_flag_beats_it(model):
    env = {
        "LLAMADIST_STAGE_MODEL": model,
        "LLAMADIST_STAGE_KV_CACHE_MB": "2048",
        "LLAMADIST_STAGE_CUDA_GRAPHS": "off",
        "LLAMADIST_STAGE_GRACE_S": "2.5",
    }
    config = parse("stage", [], env)
    assert (config.model, config.kv_cache_mb, config.cuda_graphs) == (model, 2048, False)
    assert config.grace_s == 2.5 and config.port == 0  # the rest: the declared defaults
    config = parse("stage", ["--kv-cache-mb", "512", "--port", "7001"], env)
    assert (config.kv_cache_mb, config.port) == (512, 7001)
    # A flag equal to the default still beats the environment.
    assert parse("stage", ["--kv-cache-mb", "1024"], env).kv_cache_mb == 1024

    orch = parse(
        "orchestrator",
        ["--model", model],
        {"LLAMADIST_ORCHESTRATOR_STAGES": "a:1, b:2+c:3", "LLAMADIST_ORCHESTRATOR_PORT": "0"},
    )
    assert orch.stages == ("a:1", "b:2+c:3") and orch.port == 0
    assert parse("orchestrator", ["--model", model, "--stages", "x:9"], {}).stages == ("x:9",)


def test_a_bad_environment_value_is_one_line_naming_the_variable(model, monkeypatch, capsys):
    monkeypatch.setenv("LLAMADIST_STAGE_PORT", "abc")
    assert main(["stage", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err == "llamadist: error: LLAMADIST_STAGE_PORT='abc' is not a valid int\n"
    monkeypatch.setenv("LLAMADIST_STAGE_PORT", "70000")  # parses, then the check refuses it
    assert main(["stage", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port must be" in err and "(from LLAMADIST_STAGE_PORT)" in err
    monkeypatch.setenv("LLAMADIST_STAGE_COMPILE", "maybe")
    monkeypatch.delenv("LLAMADIST_STAGE_PORT")
    assert main(["stage", "--model", model]) == 2
    assert "LLAMADIST_STAGE_COMPILE='maybe' is not a valid bool" in capsys.readouterr().err


def test_orchestrator_stages_are_required_unless_the_environment_gives_them(model, capsys):
    assert main(["orchestrator", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err == (
        "llamadist: error: --stages is required (or set LLAMADIST_ORCHESTRATOR_STAGES)\n"
    )


# ---------------------------------------------------------------------- adding a knob


def test_a_one_line_knob_gets_a_flag_an_environment_variable_and_its_check(model):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(ServiceConfig):
        prefill_chunk: int = knob(512, "tokens per prefill chunk", check=positive)
        verbose: bool = knob(False, "say more")

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended, "X")
    flags = flags_of(parser)
    assert flags["--prefill-chunk"].default == 512 and "tokens per prefill chunk" in (
        flags["--prefill-chunk"].help
    )
    assert "--verbose" in flags and "X_PREFILL_CHUNK" in flags["--prefill-chunk"].help
    args = parser.parse_args(["--model", model, "--verbose"])
    config = from_args(Extended, args, "X", {"X_PREFILL_CHUNK": "64"})
    assert (config.prefill_chunk, config.verbose) == (64, True)
    with pytest.raises(ConfigError, match="^--prefill-chunk must be positive, got 0"):
        Extended(model=model, prefill_chunk=0)


def test_the_configs_and_the_command_line_load_no_torch():
    code = (
        "import sys, client.cli, stage_service.config, orchestrator.config\n"
        "client.cli.build_parser()\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------- the README


def readme_commands() -> list[tuple[list[str], str]]:
    """(command path, usage text) of every `llamadist ...` line in the README's code blocks,
    with its continuation lines."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    found = []
    for block in blocks:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("llamadist "):
                continue
            usage = line.split("  #")[0]
            for more in lines[i + 1 :]:  # indented continuation lines
                if not more.startswith(" ") or more.strip().startswith("#"):
                    break
                usage += " " + more.split("  #")[0]
            words = usage.split()[1:]
            path = []
            for w in words:
                if w.startswith("-") or w.startswith("["):
                    break
                path.append(w)
            found.append((path, usage))
    return found


def parser_for(path: list[str]) -> argparse.ArgumentParser:
    parsers = dict(all_parsers())
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in parsers:
            return parsers[tuple(path[:n])]
    raise AssertionError(f"README shows llamadist {' '.join(path)}, which is no command")


def test_readme_usage_lines_match_the_declarations():
    """Every flag a README usage line shows exists for that command; `[--flag VALUE]` shows the
    declared default, `[--flag a|b]` values the knob accepts (placeholders such as N skipped)."""
    commands = readme_commands()
    assert any(p == ["stage"] for p, _ in commands) and any(
        p == ["orchestrator"] for p, _ in commands
    )
    for path, usage in commands:
        flags = flags_of(parser_for(path))
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage):
            assert flag in flags, f"README: llamadist {' '.join(path)} has no {flag}"
        if path and path[0] in SERVICES:
            cls, _ = SERVICES[path[0]]
            for flag, shown in re.findall(r"\[(--[a-z][a-z0-9-]*) ([^\]]+)\]", usage):
                check_documented(cls, flags[flag].dest, flag, shown)


def check_documented(cls: type, name: str, flag: str, shown: str) -> None:
    f = cls.__dataclass_fields__[name]
    values = [v for v in shown.split("|") if not re.search(r"[A-Z]", v)]  # N, DIR: placeholders
    if "|" not in shown:
        if values:  # a plain value is the default
            parsed = type(default_of(f))(values[0])
            assert parsed == default_of(f), f"README shows {flag} {shown}, declared {default_of(f)}"
        return
    for value in values:  # alternatives: each one a value the knob takes
        k = f.metadata["knob"]
        assert k.choices is None or value in k.choices, f"README: {flag} {value} is no choice"
        assert k.check is None or k.check(value) is None, f"README: {flag} {value} is refused"


def test_every_flag_the_readme_names_in_its_text_exists():
    """Flags in the prose's `code spans` (code blocks are the usage lines above, or docker's)."""
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    from bench.mesh import add_arguments  # the benchmark's flags (python -m bench.mesh)

    bench = argparse.ArgumentParser()
    add_arguments(bench)
    known = {"--help"} | {s for _, p in [*all_parsers(), ((), bench)] for s in flags_of(p)}
    spans = " ".join(re.findall(r"`([^`\n]+)`", text))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", spans))
    assert "--session-ttl-s" in named
    for flag in named:
        assert flag in known, f"README names {flag}, which no command has"
