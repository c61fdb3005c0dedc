//! `Pdu`: a stored or new room event as ruma's state resolution and auth rules see it.

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId, events::TimelineEventType,
};
use serde::Deserialize;
use serde_json::value::RawValue as RawJsonValue;

use crate::{
    error::{Error, Result},
    storage::StoredEvent,
};

#[derive(Clone, Debug, Deserialize)]
pub struct Pdu {
    #[serde(skip_deserializing, default = "placeholder_event_id")]
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    pub state_key: Option<String>,
    #[serde(default)]
    pub prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: UInt,
    #[serde(skip)]
    pub content_redacts: Option<OwnedEventId>,
}

fn placeholder_event_id() -> OwnedEventId {
    OwnedEventId::try_from("$placeholder").expect("valid event id")
}

impl Pdu {
    /// Parses a PDU's JSON, with its (separately known) event id.
    pub fn parse(event_id: &str, json: &str) -> Result<Self> {
        let mut pdu: Pdu =
            serde_json::from_str(json).map_err(|e| Error::internal(format!("bad stored PDU {event_id}: {e}")))?;
        pdu.event_id = OwnedEventId::try_from(event_id).map_err(Error::internal)?;
        if pdu.kind == TimelineEventType::RoomRedaction {
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            pdu.content_redacts = serde_json::from_str::<Redacts>(pdu.content.get()).ok().and_then(|r| r.redacts);
        }
        Ok(pdu)
    }

    pub fn from_stored(event: &StoredEvent) -> Result<Self> {
        Self::parse(&event.event_id, &event.json)
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref().or(self.content_redacts.as_ref())
    }
    fn rejected(&self) -> bool {
        false
    }
}
