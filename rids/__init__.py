"""rids: lossless parallel decoding (R-ISD) of autoregressive LLMs with gated LoRA adapters."""

from rids.utils import huge_pages

huge_pages.request()  # before any tensor exists (PyTorch reads it once)

from rids.errors import RidsError  # noqa: E402
from rids.llm import LLM  # noqa: E402
from rids.outputs import GenerationOutput, GenerationStats  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "GenerationOutput", "GenerationStats", "RidsError", "__version__"]
