"""samhq-fast: SAM-HQ inference with an exact eager reference and Triton-kernel fast paths."""

from .automatic import SamHQAutomaticMaskGenerator
from .build import build_sam_hq, load, sam_model_registry
from .checkpoint import CheckpointError
from .modeling import SamHQ, SamHQConfig
from .predictor import SamHQPredictor

__version__ = "0.1.0"
__all__ = ["load", "build_sam_hq", "sam_model_registry", "SamHQ", "SamHQConfig", "SamHQPredictor", "SamHQAutomaticMaskGenerator", "CheckpointError"]
