"""The bottom layer: errors, defaults, run environment, file I/O, progress and the training engine.

Nothing here imports another labelsieve layer."""
