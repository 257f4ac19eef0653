"""``python -m multichex.cli``: the same app as the ``multichex`` console script."""

from multichex.cli import app

app()
