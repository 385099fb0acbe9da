"""python -m scaling_lab.results export RESULTS --to mlflow|tensorboard|wandb: scaling_lab/tracking/export.py."""

import sys

from scaling_lab.tracking.export import main

sys.exit(main())
