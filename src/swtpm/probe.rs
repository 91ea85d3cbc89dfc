//! Probing the installed swtpm (being written).
