//! swtpm control channel (being written).
