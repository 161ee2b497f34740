"""User-facing errors.

A `TLError` is a mistake in the user's input (a path, a value, a name): its message is one line that names the
culprit and the fix. Entry points print it without a traceback and exit non-zero; anything else is a bug and keeps
its traceback.
"""


class TLError(Exception):
    """Bad input: one line naming the culprit and the fix."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during fitting: Lightning saved the state and exits with status 1; tl says so in one line and
    exits like an interrupted process (130)."""


class Terminated(BaseException):
    """SIGTERM in tl.export, tl.predict or tl.evaluate (`tl.utils.terminate_as_exception`): raised in the main thread
    so that clean-ups run (scratch files removed, earlier files kept) before the one-line exit with status 143. A
    BaseException, so that no `except Exception` swallows it."""
