"""The ``kvmesh`` command. Each subcommand lives in its own module, imported
only when chosen, so ``kvmesh gateway`` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines configure(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("kvmesh.gateway.up", "start a gateway and local workers on the embedded defaults"),
    "worker": ("kvmesh.worker.cli", "serve a model as a kvmesh worker"),
    "gateway": ("kvmesh.gateway.cli", "run the prefix-aware gateway"),
    "chat": ("kvmesh.chat", "talk with the served model (interactive, streaming, with history)"),
    "generate": ("kvmesh.client", "send one prompt (a chat turn; --raw: plain text) and stream the answer"),
    "operator": ("kvmesh.operator.main", "run the Kubernetes operator"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="kvmesh", description="Kubernetes-native LLM inference.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"kvmesh {name}", description=COMMANDS[name][1])
    module.configure(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
