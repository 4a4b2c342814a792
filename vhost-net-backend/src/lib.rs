//! cardsim's networking card: vhost-user-net ports switched as a VPC.
