//! Guest registry and lifecycle (being written).
