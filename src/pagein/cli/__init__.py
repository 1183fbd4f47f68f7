"""Command-line front end. Each ``pagein.cli.<name>`` module with a ``register`` function
adds one subcommand; each subcommand calls one library function."""
