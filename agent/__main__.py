"""The ``mlagent`` command line. Only this module exits the process.

    mlagent run [--config FILE]      run the agent (embedded default config without --config)
    mlagent validate FILE            report every config error with its key path; exit 0 or 1
    mlagent print-default-config     print the embedded default config
    mlagent reference ...            build, list, show and reset drift references
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("mlagent")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlagent",
                                description="Telemetry agent for machines that serve ML models.")
    p.add_argument("--version", action="version", version=f"mlagent {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", "-c", default=os.environ.get("MLAGENT_CONFIG"),
                     help="TOML pipeline file (default: $MLAGENT_CONFIG, else the embedded default)")

    val = sub.add_parser("validate", help="check a config file and report every error")
    val.add_argument("config", nargs="?", help="TOML file (default: the embedded default)")

    sub.add_parser("print-default-config", help="print the embedded default config")

    from agent.connectors.drift import cli as drift_cli

    drift_cli.add_parser(sub)
    return p


def cmd_validate(path: str | None) -> int:
    from agent.config import ConfigError
    from agent.service import load

    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"{e.source}: {len(e.errors)} error(s)", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    print(f"{cfg.source}: ok ({len(cfg.pipelines)} pipelines, {len(cfg.components)} components)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # gRPC core logs every failed TLS handshake (a plaintext client, a port
        # scanner) as a plain-text INFO line on stderr, outside the agent's structured
        # log. Errors only, unless the environment asks for more.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from agent.service import run_agent

        return run_agent(args.config)
    if args.command == "validate":
        return cmd_validate(args.config)
    if args.command == "print-default-config":
        from agent.service import default_config_text

        sys.stdout.write(default_config_text())
        return 0
    if args.command == "reference":
        from agent.connectors.drift import cli as drift_cli

        return int(drift_cli.run(args))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
