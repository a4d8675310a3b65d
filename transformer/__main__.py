"""``python -m transformer``: train, fine-tune, evaluate and use the reference models."""

import sys

try:
    from .training.cli import main
except ImportError as e:           # the training extras are not installed
    sys.exit(f"python -m transformer needs the training extras ({e.name} is missing): "
             f"pip install 'fused-transformer-kernels[train]'")

sys.exit(main())
