"""tl: transfer learning for image classification on timm backbones, trained by Lightning, configured by Hydra."""

__version__ = "0.1.0"
