"""``python -m luthien_control.mock_backend [--host HOST] [--port PORT]``."""

from __future__ import annotations

import argparse

from luthien_control.mock_backend.server import DEFAULT_HOST, DEFAULT_PORT, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m luthien_control.mock_backend",
        description="Run the built-in OpenAI-compatible mock backend.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument(
        "--api-key", default=None, help="require this bearer key (default $MOCK_BACKEND_API_KEY)"
    )
    args = parser.parse_args(argv)
    run(args.host, args.port, api_key=args.api_key)


if __name__ == "__main__":
    main()
