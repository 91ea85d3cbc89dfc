//! On-disk and runtime layout (being written).
