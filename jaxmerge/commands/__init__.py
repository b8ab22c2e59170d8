"""Subcommands of the ``jaxmerge`` console command."""
