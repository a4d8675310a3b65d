"""``python -m transformer``: train, fine-tune, evaluate and use the reference models."""

import sys

from .training.cli import main

sys.exit(main())
