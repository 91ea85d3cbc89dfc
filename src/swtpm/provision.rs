//! Provisioning with swtpm_setup (being written).
