"""Command-line entry point: ``imba <command> [options]``.

Each command lives in the module that implements it and exposes
``cli_main(argv: list[str], prog: str) -> int``; this file only dispatches, so that
``imba --help`` stays fast and a command's heavy imports load only when it runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("imba.training", "train a text-conditioned DiT with the plain or IMBA loss"),
    "sample": ("imba.sampling", "sample images from a checkpoint with classifier-free guidance"),
    "concepts": ("imba.concepts", "count noun concepts and their co-occurrence in captions"),
    "bench": ("imba.benchmark", "build an Inert-CompBench prompt set from captions"),
    "evaluate": ("imba.evaluation.cli", "score generated images with a judge"),
    "reproduce": ("imba.reproduce", "execute the notebooks with a parameter preset"),
}


def _usage() -> str:
    lines = ["usage: imba <command> [options]", "", "commands:"]
    for name, (_, summary) in COMMANDS.items():
        lines.append(f"  {name:<10} {summary}")
    lines.append("")
    lines.append("Run `imba <command> --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` to the command's ``cli_main`` and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"imba: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.cli_main(rest, prog=f"imba {command}") or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Invalid input reaches the user as one line; IMBA_DEBUG=1 keeps the traceback.
        if os.environ.get("IMBA_DEBUG"):
            raise
        print(f"imba {command}: error: {exc} (set IMBA_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
