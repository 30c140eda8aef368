"""The `rids` command line (installed as the package `rids_cli`)."""
