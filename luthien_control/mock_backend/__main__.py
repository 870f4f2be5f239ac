"""``python -m luthien_control.mock_backend [--host HOST] [--port PORT] [--api-key KEY]
[--scenario JSON]``."""

from __future__ import annotations

import argparse

from luthien_control.exceptions import ConfigurationError
from luthien_control.mock_backend.server import DEFAULT_HOST, DEFAULT_PORT, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m luthien_control.mock_backend",
        description="Run the built-in OpenAI- and Anthropic-compatible mock backend.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument(
        "--api-key", default=None, help="require this bearer key (default $MOCK_BACKEND_API_KEY)"
    )
    parser.add_argument(
        "--scenario",
        default=None,
        metavar="JSON",
        help="x-mock-* directives as a JSON object, for requests that send none "
        "(default $MOCK_SCENARIO)",
    )
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, api_key=args.api_key, scenario=args.scenario)
    except ConfigurationError as exc:
        parser.error(exc.message)


if __name__ == "__main__":
    main()
