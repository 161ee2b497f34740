"""tl: transfer learning for image classification on timm backbones, trained by Lightning, configured by Hydra."""

import sys

__version__ = "0.1.0"


def _interrupted_while_starting(kind, value, tb) -> None:
    """Ctrl-C before an entry point's own handler is in place (while torch, timm and Lightning import): one line, not
    a traceback through the imports. Nothing has been written yet. Python still exits as interrupted (130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("tl: interrupted by Ctrl-C while starting: nothing was written", file=sys.stderr)
        return
    sys.__excepthook__(kind, value, tb)


if sys.argv[:1] == ["-m"] and sys.excepthook is sys.__excepthook__:  # python -m tl.<entry point>, not an import
    sys.excepthook = _interrupted_while_starting
