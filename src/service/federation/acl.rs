//! Server ACLs (`m.room.server_acl`): a room's state may deny servers; what a denied
//! server sends about the room (events, EDUs, joins, requests for its history) is
//! refused, as the spec asks of every server in the room.

use ruma::{RoomId, ServerName, events::room::server_acl::RoomServerAclEventContent};

use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// Whether the room's current server ACL lets `server` take part (no ACL: yes).
    pub async fn server_allowed_in_room(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        let Some(event) = self.store.get_current_state_event(room_id.as_str(), "m.room.server_acl", "").await? else {
            return Ok(true);
        };
        let pdu: serde_json::Value = serde_json::from_str(&event.json).map_err(Error::internal)?;
        // An ACL that does not parse denies nobody (it cannot have passed the
        // content checks of a local send; a remote one is judged as written).
        Ok(match serde_json::from_value::<RoomServerAclEventContent>(pdu["content"].clone()) {
            Ok(acl) => acl.is_allowed(server),
            Err(_) => true,
        })
    }

    /// `M_FORBIDDEN` when the room's server ACL denies `server`.
    pub async fn require_server_allowed(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        if self.server_allowed_in_room(room_id, server).await? {
            Ok(())
        } else {
            Err(Error::forbidden(format!("The room's server ACL denies {server}")))
        }
    }
}
