"""The ``gptqlora`` command line, derived from each command's config dataclass (each field is one ``--flag``).

Subcommands: quantize, perplexity, finetune, eval, merge, run (see ``gptqlora.commands``). This module is the error
boundary: a ``UsageError`` (the user's input, options or environment) prints one line and exits 2; a disk that is
full or read-only does the same; Ctrl-C (exit 130) or SIGTERM (exit 143) stops at a safe point and says how to
continue; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from gptqlora.errors import NonFiniteLossError, UsageError

_SCALARS = {"int": int, "float": float, "str": str}


def _flag_names(name: str, aliases: Sequence[str]) -> list[str]:
    names = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        names.append(f"--{name}")  # the seed's spelling (--batch_size) keeps working
    return names + [a for a in aliases if a != "--asym"]


def _choices(choices: tuple | str | None) -> tuple | None:
    """A field's choices: a tuple, or the dotted name of one that a higher layer owns (``config.opt``)."""
    if not isinstance(choices, str):
        return choices
    module, _, name = choices.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, dest: str, aliases: Sequence[str]) -> None:
    meta = f.metadata
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    required = meta.get("required", False)
    help_text = meta.get("help", "") + ("" if required else f" (default: {default})")
    kind = str(f.type).replace(" | None", "")
    names = _flag_names(f.name, tuple(meta.get("aliases", ())) + tuple(aliases))
    if kind == "bool":
        group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        if "--asym" in meta.get("aliases", ()):
            group.add_argument("--asym", dest=dest, action="store_false", help="Same as --no-sym.")
    else:
        group.add_argument(*names, dest=dest, type=_SCALARS[kind], default=None, choices=_choices(meta.get("choices")),
                           help=help_text, metavar=f.name.upper(), required=required)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per scalar field of ``cls`` and per field of each of its groups; every default stays None.

    Defaults stay in the dataclasses: a flag left out is simply not passed to the constructor. A group field's
    flags go to ``dest`` ``group.field``; the command's own fields keep their names.
    """
    own = parser.add_argument_group(cls.__name__.removesuffix("Args").lower() + " options")
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is None:
            _add_field(own, f, f.name, ())
            continue
        g = parser.add_argument_group(sub.__name__.removesuffix("Config").lower())
        for sf in dataclasses.fields(sub):
            _add_field(g, sf, f"{f.name}.{sf.name}", f.metadata["aliases"].get(sf.name, ()))


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build a command's config from the flags that were given; validation happens in each ``__post_init__``."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is None:
            if getattr(ns, f.name, None) is not None:
                given[f.name] = getattr(ns, f.name)
            continue
        values = {sf.name: getattr(ns, f"{f.name}.{sf.name}") for sf in dataclasses.fields(sub)
                  if getattr(ns, f"{f.name}.{sf.name}", None) is not None}
        given[f.name] = sub(**values)
    return cls(**given)


def build_parser() -> argparse.ArgumentParser:
    from gptqlora.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="gptqlora", description="GPTQ quantization + LoRA fine-tuning on GSM8K.",
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log each layer's GPTQ loss and more.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        add_config_args(p, command.args)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is, so that a ``kill`` (or torchrun,
    systemd, a batch scheduler) stops a command the way Ctrl-C does: every lock and staging context unwinds."""


@contextmanager
def _sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """Within it, SIGTERM raises ``Terminated``; the previous handler comes back after (installed by the CLI only:
    importing the library changes no signal handler).

    A second SIGTERM while the first unwinds ends the process at once, as SIGKILL would (every output is safe from
    a kill); a child forked meanwhile keeps SIGTERM's default.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pid = os.getpid()

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != pid:  # a forked child (a data loader worker...): end as it would have without us
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupted_hint(command: str) -> str:
    if command in ("finetune", "run"):
        return "rerun the same command with --resume to continue from the last checkpoint"
    if command in ("eval", "sample"):
        return "rerun the same command with --resume to continue after the last finished batch"
    if command == "quantize":  # a streamed quantization keeps its finished blocks in .OUT.quantizing
        return "nothing was written to --out; rerun the same command, with --resume to keep the blocks already done"
    return "nothing was written to the output; rerun the command"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status. A worker of a torchrun job of several processes exits here
    instead (``distributed.exit_process``), once the command has left the process group."""
    from gptqlora import distributed

    code = run_command(argv)
    if distributed.world().distributed:
        distributed.exit_process(code)
    return code


def run_command(argv: Sequence[str] | None = None) -> int:
    from gptqlora.commands import COMMANDS
    from gptqlora.files import is_disk_error

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    command = COMMANDS[args.command]
    try:
        config = config_from_args(command.args, args)
    except UsageError as e:
        parser.error(str(e))
    try:
        with _sigterm_stops_like_ctrl_c():
            result = command.run(config)
    except (UsageError, NonFiniteLossError) as e:  # a diverged run is not a bug: its message says how to go on
        print(f"gptqlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_error(e):
            raise
        print(f"gptqlora {args.command}: error: cannot write {e.filename or 'the output'}: {e.strerror}; free space "
              "or choose a writable location (no partial output was left behind)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (``Terminated``): the shell's 128 + the signal's number
        terminated = isinstance(e, Terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\ngptqlora {args.command}: {how}: {_interrupted_hint(args.command)}", file=sys.stderr)
        return 143 if terminated else 130
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
