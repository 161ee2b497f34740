"""Lightning callbacks: sanity checks, TensorBoard diagnostics (one per concern) and the learning-rate finder."""

from tl.callbacks.confusion import ValConfusion
from tl.callbacks.dynamics import StageHistograms, UpdateRatios
from tl.callbacks.lr_finder import find_lr
from tl.callbacks.run_summary import RunSummary
from tl.callbacks.samples import ImageSamples
from tl.callbacks.sanity import InitialLossCheck, InitialLossWarning, OverfitCheck, OverfitWarning
from tl.callbacks.tensorboard import TensorBoardCallback

DIAGNOSTICS = (RunSummary, UpdateRatios, StageHistograms, ImageSamples, ValConfusion)

__all__ = ["DIAGNOSTICS", "ImageSamples", "InitialLossCheck", "InitialLossWarning", "OverfitCheck", "OverfitWarning",
           "RunSummary", "StageHistograms", "TensorBoardCallback", "UpdateRatios", "ValConfusion", "find_lr"]
