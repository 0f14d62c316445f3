"""``python -m fieldreid.cli``: the same command line as the ``fieldreid`` console script."""
import sys

from fieldreid.cli.app import app

sys.exit(app())
