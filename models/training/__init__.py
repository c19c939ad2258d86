"""Training, evaluation and export recipes for the reference models (needs the ``train`` extra)."""
