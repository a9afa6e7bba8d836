"""The command line every job shares: ``--config``, overrides, ``--help``, ``--print-config``.

Config, input and output problems end the process with exit code 2 and one line on stderr
naming what is wrong, before any work or cluster time is spent.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from georeasoner.core.config import ConfigError, InputError, JobConfig, describe, load_config, to_yaml
from georeasoner.core.outputs import OutputConflict

USAGE = "usage: python jobs/{job}.py --config configs/{job}/<variant>.yaml [dotted.key=value ...] [--print-config] [--help]"


def _usage_error(job: str, message: str) -> int:
    print(f"{message}\n{USAGE.format(job=job)}", file=sys.stderr)
    return 2


def parse_args(argv: list[str]) -> tuple[str | None, list[str], bool, bool]:
    """Split argv into (config path, overrides, print_config, help)."""
    config, overrides, print_config, want_help = None, [], False, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--print-config":
            print_config = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("config error: --config needs a path")
            config = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"config error: unknown option '{arg}'")
        else:
            overrides.append(arg)
        i += 1
    return config, overrides, print_config, want_help


def main(job: str, model: type[JobConfig], run: Callable[[JobConfig], dict], argv: list[str] | None = None, doc: str = "") -> int:
    """Parse, validate, check inputs, then call ``run(cfg)``. Returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, overrides, print_config, want_help = parse_args(argv)
        if want_help:
            print(USAGE.format(job=job))
            if doc:
                print("\n" + doc.strip())
            print("\nkeys (set in the YAML file or as key=value):")
            print("\n".join(describe(model)))
            return 0
        if config is None and not overrides:
            return _usage_error(job, "config error: no --config given")
        cfg = load_config(model, config, overrides)
        cfg.storage.apply()  # the job's storage settings, before check_inputs reads anything
        workdir = os.environ.get("GEOREASONER_WORKDIR")
        if workdir:  # the config file was read from the uploaded copy; data paths resolve on the head
            os.chdir(workdir)
        if print_config:
            print(to_yaml(cfg), end="")
            return 0
        cfg.check_inputs()
        cfg = cfg.absolute_paths()
    except (ConfigError, InputError) as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (ConfigError, InputError, OutputConflict) as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{job}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def entrypoint(job: str, model: type[JobConfig], run: Callable[[JobConfig], dict], doc: str = "") -> None:
    """``sys.exit(main(...))`` for ``jobs/<job>.py``.

    Under ``ray job submit`` the entrypoint runs in a copy of the uploaded working dir; set
    ``GEOREASONER_WORKDIR`` (e.g. in the runtime env) to resolve relative paths such as
    ``outputs/local/...`` against a folder on the head instead (a local head: the repo itself).
    """
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code = main(job, model, run, doc=doc)
    ray = sys.modules.get("ray")
    if code == 2 and not (ray is not None and ray.is_initialized()):
        # refused before any work: leave at once. Interpreter teardown with Arrow's thread pools alive can abort
        # (SIGABRT, "terminate called without an active exception", apache/arrow#34314): seen once in the suite
        # after the one-line error was printed, turning exit code 2 into -6
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
