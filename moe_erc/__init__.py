"""moe-erc: Mixture-of-Experts pre-training on megatron-core with the expert-router coupling loss."""

__version__ = "0.1.0"
