"""Telemetry: OpenTelemetry traces and metrics for every inkling process.

Instrumented code uses the OpenTelemetry API only (`trace.get_tracer`, the instruments
of `instruments`); until a process calls `providers.configure`, every span and
measurement is a no-op. Each process's entry point configures it once:

- `providers`: tracer and meter providers from the standard `OTEL_*` variables and the
  process's settings, the resource (`service.name`, `service.version`,
  `service.instance.id`), the sampler, the OTLP trace exporter, the Prometheus
  `/metrics` endpoint.
- `instruments`: every metric the project records, named once, with buckets sized for
  a 1-100 ms service.
- `rpc`: the gRPC server interceptor (one span and one `rpc.server.call.duration` per
  call) and the client interceptor (W3C trace context out, `rpc.client.call.duration`).
- `logs`: `trace_id` and `span_id` on every log record written inside a span.
"""
