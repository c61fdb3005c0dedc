//! Federation: talking to other homeservers. `discovery` finds where a server name is
//! served (the spec's server discovery); the rest of this module grows the outbound
//! client, server keys and the event exchange.

pub mod discovery;
pub mod edus;
pub mod sender;
pub mod transactions;
