"""gram-jax."""
