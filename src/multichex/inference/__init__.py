"""multichex.inference."""
