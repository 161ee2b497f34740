"""User-facing errors.

A `TLError` is a mistake in the user's input (a path, a value, a name): its message is one line that names the
culprit and the fix. Entry points print it without a traceback and exit non-zero; anything else is a bug and keeps
its traceback.
"""

import errno


class TLError(Exception):
    """Bad input: one line naming the culprit and the fix."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during fitting: Lightning saved the state and exits with status 1; tl says so in one line and
    exits like an interrupted process (130)."""


class Terminated(BaseException):
    """SIGTERM in tl.export, tl.predict or tl.evaluate (`tl.utils.terminate_as_exception`): raised in the main thread
    so that clean-ups run (scratch files removed, earlier files kept) before the one-line exit with status 143. A
    BaseException, so that no `except Exception` swallows it."""


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (itself, or the first in its chain of causes and contexts), or None.

    A failed write often surfaces as something else: `torch.save` on a full disk raises a RuntimeError ("unexpected
    pos ...") while handling the OSError that says what went wrong."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return None


# A write that failed for lack of space: no space on the device, over quota, over the file size limit (ulimit -f).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Failures of the environment, not of tl: no space, or a place tl may not write to.
ENVIRONMENT = (*NO_SPACE, errno.EROFS, errno.EACCES, errno.EPERM)
