"""metadiff: meta-learning via diffusion, as Hydra-configured Lightning stages."""

__version__ = "0.1.0"
