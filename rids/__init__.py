"""rids: lossless parallel decoding (R-ISD) of autoregressive LLMs with gated LoRA adapters."""

from rids.errors import RidsError
from rids.llm import LLM
from rids.outputs import GenerationOutput, GenerationStats

__version__ = "0.1.0"
__all__ = ["LLM", "GenerationOutput", "GenerationStats", "RidsError", "__version__"]
