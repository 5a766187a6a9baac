"""Traces mode: the model server's own OpenTelemetry request spans as the request source."""
