"""Analyses of finished runs, each an ``lcd`` subcommand: ``onsets``, ``rescore``, ``patch-matrix``, ``compare``."""
