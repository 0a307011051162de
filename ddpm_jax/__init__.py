"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `ddpm_jax.load` imports JAX and the model on first use, so `import ddpm_jax` stays cheap.
    if name == "load":
        from ddpm_jax.api import load

        return load
    raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
