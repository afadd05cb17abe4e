"""One module per CLI subcommand (see jaxrefine.cli)."""
