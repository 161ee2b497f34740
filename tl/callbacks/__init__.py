"""Lightning callbacks: sanity checks, TensorBoard diagnostics and the learning-rate finder."""

from tl.callbacks.diagnostics import Diagnostics
from tl.callbacks.lr_finder import find_lr
from tl.callbacks.sanity import InitialLossCheck, InitialLossWarning, OverfitCheck, OverfitWarning

__all__ = ["Diagnostics", "InitialLossCheck", "InitialLossWarning", "OverfitCheck", "OverfitWarning", "find_lr"]
