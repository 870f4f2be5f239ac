"""The ``luthien-control`` command line.

Each command is a small function. Whatever the input, the answer to a failure is one
line on stderr, ``luthien-control: error: ...``, never a traceback: a user mistake (a
bad argument, a ``LuthienError``) exits 2; anything unexpected (a bug) exits 1, with its
traceback only under ``--debug`` or ``LOG_LEVEL=DEBUG``. The line is escaped: a control
character from a file or an argument is printed as ``\x1b``, never sent to the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from dotenv import load_dotenv

from luthien_control.exceptions import LuthienError
from luthien_control.settings import DEFAULT_HOST, DEFAULT_MOCK_PORT, DEFAULT_PORT

PROG = "luthien-control"
MAX_MESSAGE_CHARS = 1000  # an error line longer than this keeps its start and its end
MAX_WORKERS = 256
MAX_LOGS_LIMIT = 1_000_000


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line
    breaks, lone surrogates from undecodable bytes, bidi overrides) escaped as in
    ``repr``, so that it cannot move the cursor, recolour or rewrite a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def one_line(message: str) -> str:
    """``message`` escaped (``printable``) and, when longer than ``MAX_MESSAGE_CHARS``,
    cut in the middle: its start names the path, its end says what is wrong."""
    line = printable(message)
    if len(line) <= MAX_MESSAGE_CHARS:
        return line
    budget = MAX_MESSAGE_CHARS - 40  # room for the marker
    head = budget * 2 // 5
    tail = budget - head
    return f"{line[:head]} [... {len(line) - head - tail} characters ...] {line[-tail:]}"


def report(message: str) -> None:
    """Print ``luthien-control: error: <message>`` as one escaped line on stderr."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose mistakes are one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        report(f"{where}{message} (see '{self.prog} --help')")
        sys.exit(2)


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argument type: an integer from ``low`` to ``high``."""

    def parse(argument: str) -> int:
        try:
            value = int(argument)
        except ValueError:  # not a number, or beyond int()'s 4,300 digits
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected an integer from {low} to {high}, got {_shown(argument)}"
            )
        return value

    return parse


def port(value: str) -> int:
    """An argument type: a TCP port (0 lets the system choose)."""
    return bounded_int(0, 65535)(value)


def text(value: str) -> str:
    """An argument type: printable text (no control characters, valid UTF-8)."""
    if not value.isprintable():
        raise argparse.ArgumentTypeError(
            f"expected printable text (UTF-8, no control characters), got {_shown(value)}"
        )
    return value


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else f"{value[:20]!r}... ({len(value)} characters)"


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


def cmd_policy_replay(args: argparse.Namespace) -> int:
    from luthien_control.db import commands

    return _run(commands.policy_replay(args.file, args.transaction, as_json=args.json))


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
    parser = ArgumentParser(
        prog=PROG,
        description="Luthien Control: an AI-control proxy for the OpenAI and Anthropic APIs.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an unexpected error, print its traceback too (as LOG_LEVEL=DEBUG does)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = command("serve", cmd_serve, "run the proxy")
    p.add_argument(
        "--host", type=text, default=None, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    p.add_argument("--port", type=port, default=None, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--workers",
        type=bounded_int(1, MAX_WORKERS),
        default=1,
        help=f"worker processes (default 1, at most {MAX_WORKERS})",
    )

    p = command(
        "mock-backend",
        cmd_mock_backend,
        "run the built-in OpenAI- and Anthropic-compatible mock backend",
    )
    p.add_argument(
        "--host", type=text, default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})"
    )
    p.add_argument("--port", type=port, default=DEFAULT_MOCK_PORT, help="port (default 9000)")
    p.add_argument(
        "--api-key",
        type=text,
        default=None,
        help="require this backend key (default $MOCK_BACKEND_API_KEY)",
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
    p.add_argument("--name", type=text, required=True, help="a unique name for the key")
    p.add_argument(
        "--key", type=text, default=None, help="use this value instead of a generated one"
    )
    command("list", cmd_keys_list, "list client keys (names, never values)", keys)
    p = command("revoke", cmd_keys_revoke, "revoke a client key", keys)
    p.add_argument("name", type=text)

    policy = sub.add_parser("policy", help="control policies").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    p = command("validate", cmd_policy_validate, "check a policy file (JSON or YAML)", policy)
    p.add_argument("file")
    p = command("load", cmd_policy_load, "store a policy file in the database", policy)
    p.add_argument("file")
    p.add_argument(
        "--name", type=text, required=True, help="create or replace the policy of this name"
    )
    command("list", cmd_policy_list, "list stored policies", policy)
    p = command("show", cmd_policy_show, "print a stored policy", policy)
    p.add_argument("name", type=text)
    p = command(
        "replay",
        cmd_policy_replay,
        "dry run: replay a recorded transaction through a policy file, with no backend call",
        policy,
    )
    p.add_argument("file")
    p.add_argument(
        "--transaction", type=text, required=True, metavar="ID", help="the recorded transaction"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sub.add_parser(
        "bench", help="benchmark the proxy against the direct call to the backend (--help)"
    )

    p = command("logs", cmd_logs, "show recorded transactions")
    p.add_argument("--transaction", type=text, metavar="ID", help="show one transaction, whole")
    p.add_argument(
        "--limit",
        type=bounded_int(1, MAX_LOGS_LIMIT),
        default=50,
        help="how many recent ones (default 50)",
    )
    p.add_argument("--follow", action="store_true", help="keep printing new ones as they come")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--outcome", type=text, help="only this outcome (ok, blocked, client_disconnected, ...)"
    )
    p.add_argument("--model", type=text, help="only this model")
    p.add_argument("--key", type=text, metavar="NAME", help="only this client key name")
    p.add_argument("--since", type=text, help="only newer than this: 10m, 2h, 1d or an ISO time")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status: 0, 2 for a mistake, 1 for a bug, 130
    when interrupted."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = arguments[:1] == ["--debug"]
    command = 1 if debug else 0
    try:
        if arguments[command : command + 1] == ["bench"]:  # it parses its own flags, --help
            from luthien_control.bench.cli import main as bench_main

            return bench_main(arguments[command + 1 :])
        try:
            args = build_parser().parse_args(arguments)
        except SystemExit as exc:  # --help (0), or a mistake already reported (2)
            return exc.code if isinstance(exc.code, int) else 2
        # Settings read .env themselves; policies that read a variable by name (such as
        # AddApiKeyHeaderFromEnv) find .env's values in the environment too.
        load_dotenv(override=False)
        debug = args.debug
        status = int(args.handler(args))
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return status
    except LuthienError as exc:
        report(exc.message)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``logs | head``): nothing to say
        _silence_stdout()
        return 1
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if debug or os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        detail = f": {exc}" if str(exc) else ""
        report(
            f"unexpected {type(exc).__name__}{detail} (a bug; run with --debug for the traceback)"
        )
        return 1


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would complain about the broken pipe again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
