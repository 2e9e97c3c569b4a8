"""moe-erc: Mixture-of-Experts pre-training on megatron-core with the expert-router coupling loss."""

__version__ = "0.1.0"

# Before anything imports megatron-core: its Python 3.11 / no-triton stand-ins (moe_erc/compat).
from moe_erc.compat import ensure_importable as _ensure_importable  # noqa: E402

_ensure_importable()
