"""What every service process sets up the same way: JSON logs, OpenTelemetry tracing and
a command line derived from its settings."""
