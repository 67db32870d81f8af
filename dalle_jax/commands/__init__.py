"""The `dalle-jax` sub-commands: argparse only, one module per sub-command, each with `register(subparsers)`.

A command parses its flags, calls the library and prints what it did. Errors the user can fix are raised as
`dalle_jax.errors.DalleJaxError` and printed by `dalle_jax.cli.main` as one line, exit 2.
"""
