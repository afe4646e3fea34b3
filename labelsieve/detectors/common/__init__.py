"""Machinery the detectors share: the protocol and result type, losses, selection rules, linear probes,
text-side checks, neighbours and tower fine-tuning. Nothing here imports a detector."""
