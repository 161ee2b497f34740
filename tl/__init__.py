"""tl: transfer learning for image classification on timm backbones, trained by Lightning, configured by Hydra."""

import os
import signal
import sys
import time

__version__ = "0.1.0"
# When the process started tl, before torch and the rest load (seconds on a slow CPU): scenario=auto's time budget
# counts the start-up of a single run from here (tl.scenarios.resolve).
STARTED = time.perf_counter()

if "torch" not in sys.modules:  # libgomp reads it once, when torch loads it
    # torch's OpenMP threads sleep between operators instead of spinning. Spinning is a little faster on cores nothing
    # else uses, and many times slower on cores shared with tl's own loader workers or any other job (the team waits
    # for a spinning thread that holds the core another one needs): scripts/bench_threads.py, README "Speed".
    # OMP_WAIT_POLICY=ACTIVE in the environment keeps libgomp's default.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_interrupted = False


def _on_sigint(signum, frame):
    """Ctrl-C while an entry point starts: remembered, then Python's own KeyboardInterrupt. A library caught mid-import
    by it may fail with another error (numpy half-initialised: scipy's import recursing), which is still Ctrl-C."""
    global _interrupted
    if _interrupted:  # already on the way out
        return
    _interrupted = True
    signal.default_int_handler(signum, frame)


def _on_sigterm_while_starting(signum, frame):
    """SIGTERM before an entry point's own handler is in place: the same one line as Ctrl-C, status 143 (the default
    action ended the process silently)."""
    import os

    print("tl: interrupted by SIGTERM while starting: nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


def _interrupted_while_starting(kind, value, tb) -> None:
    """Ctrl-C before an entry point's own handler is in place (while torch, timm and Lightning import): one line, not
    a traceback through the imports. Nothing has been written yet. Python still exits as interrupted (130)."""
    if issubclass(kind, KeyboardInterrupt) or _interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting: a second Ctrl-C must not interrupt the message
        print("tl: interrupted by Ctrl-C while starting: nothing was written", file=sys.stderr)
        if not issubclass(kind, KeyboardInterrupt):
            sys.exit(130)
        return
    sys.__excepthook__(kind, value, tb)


if sys.argv[:1] == ["-m"] and sys.excepthook is sys.__excepthook__:  # python -m tl.<entry point>, not an import
    sys.excepthook = _interrupted_while_starting
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm_while_starting)
