"""What every service process sets up the same way: JSON logs and OpenTelemetry tracing."""
