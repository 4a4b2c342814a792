//! card firmware
