"""What every service process sets up the same way (JSON logs, OpenTelemetry tracing, a
command line derived from its settings) and what both sides of the engine API import (its
gRPC stubs, `proto`; the tool call parser, `tool_calls`; its token and TLS, `security`;
the `/metrics` endpoint, `exposition`)."""
