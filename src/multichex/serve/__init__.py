"""``multichex serve``: local web app (FastAPI) for the multi-task chest X-ray model.

Research software, NOT for clinical use.
"""

from multichex.serve.app import create_app

__all__ = ["create_app"]
