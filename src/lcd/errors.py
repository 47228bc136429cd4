"""User errors at the command line: the sentence that says what is wrong and how to fix it, printed last.

Every lcd command (``lcd``, ``lightning``, ``python -m lcd``, and the ``lcd <tool>`` analysis
tools) runs inside :func:`user_errors`. A *user error* is

- a ``ValueError``, ``TypeError``, ``FileNotFoundError`` or ``ModuleNotFoundError`` raised by a ``raise``
  statement in lcd's own source (a config that cannot work, a layer out of range, an unreadable file),
  also when jsonargparse wrapped it while instantiating a config's classes (its wrapper chains the
  original as ``__cause__`` and ends in a ``Namespace(...)`` dump of the config), or
- Lightning's ``MisconfigurationException`` (a Trainer setting that cannot work).

A user error ends the command with two lines on stderr, the fix-it message last::

    lcd: stopped (LCD_DEBUG=1 shows the traceback)
    lcd: error: LoRA rank r must be >= 1, got 0: set model.init_args.method.init_args.r (the paper's 16).

and exit status 2 (argparse's status for bad usage). Everything else, e.g. a ``TypeError`` from a bad call
inside lcd, is a bug and keeps its traceback. ``LCD_DEBUG=1`` in the environment shows the traceback of user
errors too. Option errors found while parsing (an unknown key, a wrong type) are reported by jsonargparse
itself: usage, then ``error: ...``, status 2.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DEBUG_ENV", "UserErrorExit", "find_user_error", "user_errors"]

DEBUG_ENV = "LCD_DEBUG"
_LCD_DIR = Path(__file__).resolve().parent
_USER_TYPES = (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError)


class UserErrorExit(SystemExit):
    """Exit with status 2 after a user error was printed.

    ``str()`` is the printed message and ``__cause__`` the original exception, so in-process callers (tests)
    can still match them: ``pytest.raises(SystemExit, match="out of range")``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _raised_by_lcd(err: BaseException) -> bool:
    """Whether ``err`` came from a ``raise`` statement in lcd's source (not from a call that failed there)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:  # the innermost frame is where it was raised
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not Path(filename).resolve().is_relative_to(_LCD_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def _is_misconfiguration(err: BaseException) -> bool:
    return any(cls.__name__ == "MisconfigurationException" for cls in type(err).__mro__)


def find_user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err``: ``err`` or the first exception it was explicitly raised from that is one.

    Returns:
        The exception whose message tells the user what to fix, or ``None`` when ``err`` is a bug.

    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_misconfiguration(current) or (isinstance(current, _USER_TYPES) and _raised_by_lcd(current)):
            return current
        current = current.__cause__  # explicit `raise ... from`: jsonargparse's wrappers, lcd's own context
    return None


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run a command's body; end a user error in one ``<prog>: error: <message>`` line and exit status 2.

    Use as a context manager or as a decorator of a command's ``main``. See the module docstring.

    Args:
        prog: The command as the user typed it, e.g. ``lcd`` or ``lcd onsets``.

    Raises:
        UserErrorExit: on a user error, after printing it.

    """
    try:
        yield
    except Exception as err:
        found = None if _debug() else find_user_error(err)
        if found is None:
            raise
        message = " ".join(str(found).split())  # one line, whatever the raise put in it
        sys.stdout.flush()
        # one write: the lines of processes that fail together (DDP ranks) do not interleave
        sys.stderr.write(f"{prog}: stopped ({DEBUG_ENV}=1 shows the traceback)\n{prog}: error: {message}\n")
        sys.stderr.flush()
        raise UserErrorExit(message) from found
