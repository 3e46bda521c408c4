//! Embedded core service (placeholder, being written).
