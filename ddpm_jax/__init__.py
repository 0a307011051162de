"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax NNX."""

__version__ = "0.1.0"
