"""multichex.serve."""
