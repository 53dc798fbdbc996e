"""The Optuna sweep launcher and the `syncbench` command line."""
