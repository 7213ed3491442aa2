"""One module per ``koopman-distill`` subcommand, each exposing ``register(subparsers)``."""
