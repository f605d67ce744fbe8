"""One module per `actsparse` subcommand, each with `register(subparsers)`."""
