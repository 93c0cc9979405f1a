//! gRPC adapter (placeholder until the server lands).
