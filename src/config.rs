//! Command-line flags (placeholder until the CLI lands).
