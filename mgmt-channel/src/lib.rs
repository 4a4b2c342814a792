//! The cardsim control plane: desired state, its REST API, and the cardctl
//! client.
