"""multichex.evaluation."""
