//! What the control plane runs on the host: card processes under
//! supervision, and instances (QEMU guests) driven over QMP.
