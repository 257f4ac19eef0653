"""multichex.data."""
