"""Ensembles of a finished study's best trials: logit averaging and model soups (``python -m ensemble.build``)."""
