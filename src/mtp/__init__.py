"""mtp: multi-token prediction for Hugging Face causal language models."""

from mtp.errors import CheckpointMismatchError, MTPError
from mtp.models.parallel_heads import MTPModel

__all__ = ["MTPModel", "MTPError", "CheckpointMismatchError"]
__version__ = "0.2.0"
