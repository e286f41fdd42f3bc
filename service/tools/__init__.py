"""The commands for the people around the relay: `check`, `publish`, `dlq`, `tasks`.

Each module adds its subcommand to the CLI (`add_parser`) and runs it; output goes
through `service.tools.output`: a table on a terminal, JSON with `--json`.
"""
