//! The spec's "Test vectors" block (docs/sealed-format.md), for the unit
//! tests that open them.

/// `name = hex` from the spec's "Test vectors" block, as bytes.
pub(super) fn vector(name: &str) -> Vec<u8> {
    let spec = include_str!("../../docs/sealed-format.md");
    let vectors = spec.split("## Test vectors").nth(1).unwrap();
    let line = vectors
        .lines()
        .find(|l| l.split('=').next().map(str::trim) == Some(name))
        .unwrap_or_else(|| panic!("no test vector {name} in the spec"));
    let hex = line.split('=').nth(1).unwrap().trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
