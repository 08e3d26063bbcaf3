"""The `quorum` command: serve, export, predict, validate, ensemble create."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from service.serve_flags import add_flags

    p = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP",
                       description="Serve a model repository. Every setting is a flag and a QUORUM_* variable "
                                   "(the flag wins); each line below names both and the default.")
    add_flags(p)
    return p


def _serve(args: argparse.Namespace) -> int:  # returns only when the server refuses to start
    from pydantic import ValidationError

    from service.setting_names import UnknownSettings, check_environment
    from service.settings import Settings

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "handler") and v is not None}
    warnings: list[str] = []
    try:
        warnings = check_environment(Settings.model_fields, os.environ)
        settings = Settings(**flags)  # flags over QUORUM_* env over defaults
    except UnknownSettings as exc:
        print(f"quorum serve: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # an old name's value is refused under its new name: say both
        print(f"quorum serve: {'; '.join([_settings_error(exc), *warnings])}", file=sys.stderr)
        return 2
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    for warning in warnings:  # a deprecated variable's name: one line each
        logging.getLogger("service.settings").warning("%s", warning)
    from service.startup import StartupError, run_checked  # after the settings: a refusal needs no TensorFlow

    try:
        code = run_checked(settings)
    except StartupError as exc:
        logging.shutdown()
        print(f"quorum serve: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(exc.code)  # a half-started server's threads must not hold the exit
    # Everything is drained, unloaded and logged: skip the interpreter's teardown, where
    # TensorFlow's and gRPC's finalizers take seconds a terminating pod does not have.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _settings_error(exc) -> str:
    """One line naming each bad setting, e.g. "--grpc-port (QUORUM_GRPC_PORT): Input should be ..."."""
    from service.serve_flags import ENV_ONLY, flag_of
    from service.setting_names import env_name
    from service.settings import Settings

    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if (error["type"] != "value_error" and where not in ENV_ONLY
                and isinstance(value, (str, int, float)) and len(str(value)) <= 80):
            message += f", not {value!r}"  # never the token's value
        if where in Settings.model_fields:  # named by its flag and variable, unless the message does
            named = env_name(where) in message
            problems.append(message if named else f"{where} {flag_of(where)}: {message}")
        else:
            problems.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quorum", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quorum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = _serve_parser(sub)
    from service.export import cli as export_cli

    export_cli.add_parser(sub)
    from service.client import predict as predict_cli

    predict_cli.add_parser(sub)
    from service.export import repository_cli

    repository_cli.add_parsers(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "serve":  # one line, as every refusal of `quorum serve` is
        serve.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        return export_cli.run(args)
    if args.command == "predict":
        return predict_cli.run(args)
    if args.command in ("validate", "ensemble"):
        return repository_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
