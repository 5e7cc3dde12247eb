"""Running a command-line job: its exit status, and an error as one line on stderr.

Exit statuses (the `mixllm-jax` commands and `python -m mixllm_jax.serve`):

    0    success
    1    an internal error: a bug or a library's failure (TypeError, KeyError, a JAX runtime error, ...)
    2    a user error: bad input, a missing or unreadable file, a refused option (ValueError and its
         DataError, CheckpointError; OSError and its FileNotFoundError; an error class of mixllm_jax
         itself; argparse's usage errors; SystemExit with a message)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


def is_user_error(e: BaseException) -> bool:
    """An error the user can act on: bad input (ValueError), a file (OSError), or one the package
    raises itself with a message for the user (its own error classes: ServeStartupError, LogError, ...)."""
    return isinstance(e, (ValueError, OSError)) or type(e).__module__.split(".")[0] == "mixllm_jax"


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 1000 else msg[:1000] + " ..."


def run_command(fn, debug: bool = False, prog: str = "mixllm-jax"):
    """Run `fn` and return what it returns. An error becomes one line on stderr and SystemExit with
    status 2 (a user error) or 1 (an internal error); with `debug` it is raised, so the traceback
    shows. A SystemExit with a message (a refused option) is a user error too; Ctrl-C exits 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_USER) from None
    except Exception as e:  # noqa: BLE001 -- DataError, CheckpointError, ValueError, OSError, ...
        if debug:
            raise
        if is_user_error(e):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        raise SystemExit(EXIT_INTERNAL) from None
