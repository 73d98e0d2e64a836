"""The `loraplex` command. Client verbs (generate, adapters, bench) talk HTTP only, so they are parsed and run
here without importing the server (torch, transformers, uvicorn: seconds of start-up a terminal user would
wait for on every call); anything else, `serve` and `--help` included, goes to the server's full CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loraplex.clients.cli import add_client_commands, run

CLIENT_VERBS = ("generate", "adapters", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in CLIENT_VERBS:
        parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA inference server")
        add_client_commands(parser.add_subparsers(dest="command", required=True))
        return run(parser.parse_args(args))
    if args and args[0] == "serve-ray":  # Ray Serve: an optional extra, imported only for this verb
        try:
            from loraplex.server.ray_serve import main as serve_ray
        except ImportError as exc:
            print(f"loraplex: error: {exc}", file=sys.stderr)
            return 2
        return serve_ray(args[1:])
    from loraplex.server.cli import main as server_main

    return server_main(args)


if __name__ == "__main__":
    sys.exit(main())
