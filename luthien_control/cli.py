"""The ``luthien-control`` command line.

Each command is a small function; user mistakes become one line on stderr and exit
status 2 (``LuthienError``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from dotenv import load_dotenv

from luthien_control.exceptions import LuthienError
from luthien_control.settings import DEFAULT_HOST, DEFAULT_MOCK_PORT, DEFAULT_PORT

PROG = "luthien-control"


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    return asyncio.run(coro) or 0


def cmd_serve(args: argparse.Namespace) -> int:
    from luthien_control.serve import serve

    return serve(host=args.host, port=args.port, workers=args.workers)


def cmd_mock_backend(args: argparse.Namespace) -> int:
    from luthien_control.mock_backend.server import run

    run(host=args.host, port=args.port, api_key=args.api_key, scenario=args.scenario)
    return 0


def cmd_init_db(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.init_db())


def cmd_keys_add(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.keys_add(args.name, args.key))


def cmd_keys_list(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.keys_list())


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.keys_revoke(args.name))


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from luthien_control.policies.loader import load_policy_file

    policy = load_policy_file(args.file)
    print(f"{args.file}: valid ({policy.type_name} '{policy.name}')")
    return 0


def cmd_policy_load(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.policy_load(args.file, args.name))


def cmd_policy_list(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.policy_list())


def cmd_policy_show(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.policy_show(args.name))


def cmd_logs(args: argparse.Namespace) -> int:
    from luthien_control.logs import run_logs

    return _run(
        run_logs(
            transaction_id=args.transaction,
            limit=args.limit,
            follow=args.follow,
            as_json=args.json,
            outcome=args.outcome,
            model=args.model,
            key_name=args.key,
            since=args.since,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Luthien Control: an AI-control proxy for the OpenAI and Anthropic APIs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = command("serve", cmd_serve, "run the proxy")
    p.add_argument("--host", default=None, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")

    p = command(
        "mock-backend",
        cmd_mock_backend,
        "run the built-in OpenAI- and Anthropic-compatible mock backend",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_MOCK_PORT, help="port (default 9000)")
    p.add_argument(
        "--api-key", default=None, help="require this backend key (default $MOCK_BACKEND_API_KEY)"
    )
    p.add_argument(
        "--scenario",
        default=None,
        metavar="JSON",
        help="x-mock-* directives as a JSON object, for requests that send none "
        "(default $MOCK_SCENARIO)",
    )

    command("init-db", cmd_init_db, "create or upgrade the database schema")

    keys = sub.add_parser("keys", help="client API keys").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = command("add", cmd_keys_add, "add a client key; prints it once", keys)
    p.add_argument("--name", required=True, help="a unique name for the key")
    p.add_argument("--key", default=None, help="use this value instead of a generated one")
    command("list", cmd_keys_list, "list client keys (names, never values)", keys)
    p = command("revoke", cmd_keys_revoke, "revoke a client key", keys)
    p.add_argument("name")

    policy = sub.add_parser("policy", help="control policies").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    p = command("validate", cmd_policy_validate, "check a policy file (JSON or YAML)", policy)
    p.add_argument("file")
    p = command("load", cmd_policy_load, "store a policy file in the database", policy)
    p.add_argument("file")
    p.add_argument("--name", required=True, help="create or replace the policy of this name")
    command("list", cmd_policy_list, "list stored policies", policy)
    p = command("show", cmd_policy_show, "print a stored policy", policy)
    p.add_argument("name")
    sub.add_parser(
        "bench", help="benchmark the proxy against the direct call to the backend (--help)"
    )

    p = command("logs", cmd_logs, "show recorded transactions")
    p.add_argument("--transaction", metavar="ID", help="show one transaction, whole")
    p.add_argument("--limit", type=int, default=50, help="how many recent ones (default 50)")
    p.add_argument("--follow", action="store_true", help="keep printing new ones as they come")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--outcome", help="only this outcome (ok, blocked, client_disconnected, ...)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--key", metavar="NAME", help="only this client key name")
    p.add_argument("--since", help="only newer than this: 10m, 2h, 1d or an ISO time")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:  # the benchmark parses its own flags (and --help)
        from luthien_control.bench.cli import main as bench_main

        return bench_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    # Settings read .env themselves; policies that read a variable by name (such as
    # AddApiKeyHeaderFromEnv) find .env's values in the environment too.
    load_dotenv(override=False)
    try:
        return int(args.handler(args))
    except LuthienError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
