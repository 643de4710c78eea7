"""Runners that orchestrate many training runs: the training-cost benchmark (`iisan bench`); the study and
tuning runners join them here. This layer sits above train/ and below the CLI."""
