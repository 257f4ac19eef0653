"""multichex.models."""
