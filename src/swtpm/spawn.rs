//! Spawning and tracking swtpm (being written).
