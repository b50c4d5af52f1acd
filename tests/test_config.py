"""Config loading: every kind of mistake reported at once, with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import main
from agent.component import Signal
from agent.config import (
    ConfigError,
    load_config,
    load_config_file,
    parse_bytesize,
    parse_duration,
    parse_endpoint,
)
from agent.registry import factories

DATA = Path(__file__).parent / "testdata"


def load(name: str, env: dict[str, str] | None = None):
    return load_config_file(DATA / name, factories(), env=env or {})


def errors_of(name: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(name, env)
    return ei.value.errors


def test_good_config_decodes_typed_values() -> None:
    cfg = load("good.toml")
    assert cfg.component("processors", "batch").config.timeout == pytest.approx(0.05)
    assert cfg.component("connectors", "count").config.interval == 90.0
    assert cfg.service.shutdown_timeout == 5.0
    assert cfg.pipelines["traces"][0] is Signal.TRACES
    assert cfg.pipelines["metrics"][1].receivers == ["otlp", "count"]


def test_typo_gets_did_you_mean() -> None:
    errs = errors_of("typo.toml")
    assert "processors.batch.send_batch_sise: unknown key (did you mean 'send_batch_size'?)" in errs
    assert "service.pipelines.traces.receivers: a pipeline needs at least one receiver" in errs


def test_every_error_reported_at_once() -> None:
    errs = errors_of("many_errors.toml")
    text = "\n".join(errs)
    expected = [
        "processors.batch.timeout: 'soon' is not a duration",
        "processors.batch.send_batch_size: expected an integer, got 'many'",
        "processors.bacth: unknown processor type 'bacth' (did you mean 'batch'?)",
        "exporters.debug.verbosity: 'loud' is not one of 'basic', 'normal'",
        "exporters.debug/unused: defined but not used in any pipeline",
        "service.health.endpoint: 'localhost' is not host:port",
        "service.state_dir: environment variable MLAGENT_TEST_UNSET_VAR is not set",
        "service.pipelines.traces.processors[1]: 'nope' is not defined in [processors]",
        "service.pipelines: connectors form a cycle: metrics -> metrics",
        "service.pipelines.event: pipeline id must start with traces, metrics or logs",
    ]
    for e in expected:
        assert e in text, f"missing {e!r} in:\n{text}"


def test_syntax_error_names_the_line() -> None:
    errs = errors_of("syntax.toml")
    assert len(errs) == 1 and "TOML syntax error" in errs[0] and "line 4" in errs[0]


def test_env_substitution_with_default_and_value() -> None:
    text = (DATA / "good.toml").read_text().replace(
        'verbosity = "normal"', 'verbosity = "${env:VERB:-basic}"')
    assert load_config(text, factories(), env={}).component(
        "exporters", "debug").config.verbosity == "basic"
    assert load_config(text, factories(), env={"VERB": "normal"}).component(
        "exporters", "debug").config.verbosity == "normal"


def test_connector_signal_mismatch_is_reported() -> None:
    text = (DATA / "good.toml").read_text().replace(
        'receivers = ["otlp", "count"]\nexporters = ["debug/metrics"]',
        'receivers = ["otlp"]\nexporters = ["debug/metrics"]\n\n'
        '[service.pipelines.logs]\nreceivers = ["count"]\nexporters = ["debug/metrics"]')
    with pytest.raises(ConfigError) as ei:
        load_config(text, factories(), env={})
    assert any("service.pipelines.logs.receivers[0]: 'count' does not support logs" in e
               for e in ei.value.errors)


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("10s", 10), ("1m30s", 90),
                                               ("2h", 7200), (5, 5.0), (0.5, 0.5)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "s", "10 parsecs", "-1s", True, -3])
def test_bad_durations(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes_and_endpoints() -> None:
    assert parse_bytesize("64MiB") == 64 * 2**20
    assert parse_bytesize("1GB") == 10**9
    assert parse_bytesize(512) == 512
    with pytest.raises(ValueError):
        parse_bytesize("lots")
    assert parse_endpoint("[::1]:4317") == "[::1]:4317"
    for bad in ("localhost", "host:99999", "http://x:1"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_validate_cli_exit_codes(capsys) -> None:
    assert main(["validate", str(DATA / "good.toml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", str(DATA / "many_errors.toml")]) == 1
    err = capsys.readouterr().err
    assert "exporters.debug/unused: defined but not used" in err
    assert main(["validate", str(DATA / "missing.toml")]) == 1
    assert "cannot read config file" in capsys.readouterr().err


def test_embedded_default_config_is_valid_and_matches_config_dir(capsys) -> None:
    assert main(["validate"]) == 0
    assert main(["print-default-config"]) == 0
    printed = capsys.readouterr().out
    repo_copy = Path(__file__).parent.parent / "config" / "agent.toml"
    assert printed.endswith(repo_copy.read_text())


@pytest.mark.parametrize("example", sorted((DATA.parent.parent / "config" / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_examples_are_valid(example: Path) -> None:
    import re

    names = set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", example.read_text()))
    env = {n: "http://127.0.0.1:1/x" if "URL" in n else "x" for n in names}
    env["OTLP_UPSTREAM"] = "127.0.0.1:4317"
    cfg = load_config_file(example, factories(), env=env)
    assert cfg.pipelines


def test_prometheus_rules_pass_promtool() -> None:
    import os
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (CI installs Debian's prometheus)")
        pytest.skip("promtool not installed")
    rules = DATA.parent.parent / "config" / "prometheus-rules.yml"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_partial_nested_table_keeps_the_components_own_defaults() -> None:
    """Setting one queue key must not reset the others an exporter chose (ordering, timeouts)."""
    text = (DATA / "good.toml").read_text().replace(
        '[exporters."debug/metrics"]',
        '[exporters."debug/metrics"]\n[exporters.file]\npath = "x.jsonl"\n'
        'sending_queue.max_items = 10\n[exporters.elasticsearch]\nsending_queue.persistent = false'
    ).replace('exporters = ["debug", "count"]', 'exporters = ["debug", "count", "file", "elasticsearch"]')
    cfg = load_config(text, factories(), env={})
    fq = cfg.component("exporters", "file").config.sending_queue
    assert fq.max_items == 10 and fq.consumers == 1  # the file exporter's own default
    eq = cfg.component("exporters", "elasticsearch").config.sending_queue
    assert eq.persistent is False and eq.timeout == 120.0  # not the generic 10s
