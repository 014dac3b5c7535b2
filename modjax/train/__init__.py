"""Training: the CLI (main), loop, step, optimizer, config handling, checkpoints and
metrics. ``python -m modjax.train --config experiments/NAME.py[:ARG] --workdir DIR``."""
