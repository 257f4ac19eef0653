"""multichex.training."""
