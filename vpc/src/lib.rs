//! The VPC switch of cardsim's networking card, without I/O.
