"""Weight-only quantization: INT8 per output channel and INT4 per group, saved as portable safetensors.

``quantize_model(model, "int4", group_size=32)`` quantizes in place; ``save_model`` records the
scheme in the checkpoint metadata and ``load_model`` rebuilds the quantized modules from it.
"""

from .linear import QuantEmbedding, QuantLinear, dequantize
from .quantize import QUANT_METADATA_KEY, QuantScheme, build_quantized, quantize_model

__all__ = ["QUANT_METADATA_KEY", "QuantEmbedding", "QuantLinear", "QuantScheme", "build_quantized", "dequantize",
           "quantize_model"]
