//! cardsim's local-NVMe card: an NVMe 1.4 controller served over vfio-user.
