//! Relations and threads: `/relations` (a parent's children, a page at a time, only
//! for users who may see the parent, and only the children they may see), `/threads`
//! (a room's thread roots by latest activity), and the check on sending that a thread
//! does not start from an event that itself relates to another. The aggregations
//! bundled into events are made where events are formatted (`format.rs`). Threads are
//! counted per viewer: the events of users the viewer ignores (`m.ignored_user_list`)
//! neither count in a thread nor are its latest event, and a thread root such a user
//! sent is listed redacted, as the spec asks.

use ruma::{CanonicalJsonObject, EventId, RoomId, UserId};
use serde_json::Value as JsonValue;

use super::{append::rules_for, messages::parse_position};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{RelationQuery, StoredEvent},
};

/// How many levels of relations `recurse` follows (the spec asks for at least 3).
pub const RECURSION_DEPTH: i64 = 3;

/// Most events one `/relations` or `/threads` request reads, whatever the user may see.
const MAX_SCANNED: usize = 5_000;

/// What `/relations` asks for.
pub struct RelationsRequest<'a> {
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub backwards: bool,
    pub limit: usize,
    pub recurse: bool,
}

/// A page of `/relations` or `/threads`.
pub struct RelationsPage {
    pub chunk: Vec<StoredEvent>,
    pub next_batch: Option<String>,
}

impl Services {
    /// `GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`.
    pub async fn relations(
        &self,
        room_id: &RoomId,
        user: &UserId,
        parent: &EventId,
        r: &RelationsRequest<'_>,
    ) -> Result<RelationsPage> {
        // Not seen, not there: a parent the user may not see is a 404.
        self.get_event_for(room_id, user, parent).await?;
        let vis = self.visibility_for(room_id, user).await?;
        let limit = r.limit.clamp(1, 100);
        let mut cursor = r.from.map(parse_position).transpose()?;
        let to = r.to.map(parse_position).transpose()?;
        let (mut chunk, mut scanned) = (Vec::new(), 0);
        loop {
            let batch_size = (limit * 2) as i64;
            let query = RelationQuery {
                room_id: room_id.as_str(),
                parent: parent.as_str(),
                rel_type: r.rel_type,
                event_type: r.event_type,
                depth: if r.recurse { RECURSION_DEPTH } else { 1 },
                from: cursor,
                to,
                backwards: r.backwards,
                limit: batch_size,
            };
            let batch = self.store.get_relations(&query).await?;
            scanned += batch.len();
            let exhausted = (batch.len() as i64) < batch_size;
            let candidates: Vec<&StoredEvent> = batch.iter().filter(|e| vis.may_see(user, e)).collect();
            let visible = self.visible_by_state(user, &vis, &candidates).await?;
            for event in batch {
                cursor = Some(event.stream_ordering);
                if visible.contains(&event.event_id) {
                    chunk.push(event);
                    if chunk.len() == limit {
                        break;
                    }
                }
            }
            if chunk.len() == limit || exhausted {
                let more = chunk.len() == limit;
                return Ok(RelationsPage { chunk, next_batch: more.then(|| cursor.unwrap_or(0).to_string()) });
            }
            if scanned >= MAX_SCANNED {
                return Ok(RelationsPage { chunk, next_batch: Some(cursor.unwrap_or(0).to_string()) });
            }
        }
    }

    /// `GET /rooms/{roomId}/threads`: thread roots the user may see, by latest activity,
    /// newest first; with `participated`, only threads the user started or posted in.
    pub async fn threads(
        &self,
        room_id: &RoomId,
        user: &UserId,
        participated: bool,
        from: Option<&str>,
        limit: usize,
    ) -> Result<RelationsPage> {
        let vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty() {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let limit = limit.clamp(1, 100);
        let mut cursor = from.map(parse_position).transpose()?;
        let participant = participated.then_some(user.as_str());
        let ignored = self.ignored_users(user).await?;
        let (mut chunk, mut scanned) = (Vec::new(), 0);
        loop {
            let batch_size = (limit * 2) as i64;
            let threads = self.store.get_threads(room_id.as_str(), cursor, participant, &ignored, batch_size).await?;
            scanned += threads.len();
            let exhausted = (threads.len() as i64) < batch_size;
            let ids: Vec<String> = threads.iter().map(|(id, _)| id.clone()).collect();
            let roots = self.store.get_events_by_ids(&ids).await?;
            let candidates: Vec<&StoredEvent> = roots
                .iter()
                .filter(|e| e.room_id == room_id.as_str() && e.position.is_some() && vis.may_see(user, e))
                .collect();
            let visible = self.visible_by_state(user, &vis, &candidates).await?;
            let mut roots: std::collections::HashMap<String, StoredEvent> =
                roots.into_iter().map(|e| (e.event_id.clone(), e)).collect();
            for (id, latest) in threads {
                cursor = Some(latest);
                if visible.contains(&id)
                    && let Some(mut root) = roots.remove(&id)
                {
                    if ignored.contains(&root.sender) {
                        // Redacting only removes keys from canonical JSON: the result is
                        // the same text or shorter, so the client form cache (checked by
                        // length) never serves one for the other.
                        root.json = self.redacted_json(room_id, &root.json).await?;
                    }
                    chunk.push(root);
                    if chunk.len() == limit {
                        break;
                    }
                }
            }
            if chunk.len() == limit || exhausted || scanned >= MAX_SCANNED {
                let more = chunk.len() == limit || (!exhausted && scanned >= MAX_SCANNED);
                return Ok(RelationsPage { chunk, next_batch: more.then(|| cursor.unwrap_or(0).to_string()) });
            }
        }
    }

    /// The users `user` ignores (the keys of `ignored_users` in its global
    /// `m.ignored_user_list` account data; none when it is missing or malformed).
    pub(crate) async fn ignored_users(&self, user: &UserId) -> Result<Vec<String>> {
        let Some(content) = self.store.get_account_data(user.as_str(), "", "m.ignored_user_list").await? else {
            return Ok(Vec::new());
        };
        let content: JsonValue = serde_json::from_str(&content).unwrap_or_default();
        Ok(content["ignored_users"].as_object().map(|users| users.keys().cloned().collect()).unwrap_or_default())
    }

    /// An event's PDU JSON as redacted by its room's version (a thread root from an
    /// ignored user).
    async fn redacted_json(&self, room_id: &RoomId, json: &str) -> Result<String> {
        let rules = rules_for(&self.room_version(room_id).await?)?;
        let object: CanonicalJsonObject = serde_json::from_str(json).map_err(Error::internal)?;
        let redacted = ruma::canonical_json::redact(object, &rules.redaction, None).map_err(Error::internal)?;
        serde_json::to_string(&redacted).map_err(Error::internal)
    }

    /// Refuses a thread event whose root relates to another event (the spec's
    /// validation of `m.thread`: 400 `M_UNKNOWN`, as it names no errcode).
    pub(crate) async fn check_thread_root(&self, room_id: &RoomId, content: &JsonValue) -> Result<()> {
        let relates_to = &content["m.relates_to"];
        if relates_to["rel_type"] != "m.thread" {
            return Ok(());
        }
        let Some(root) = relates_to["event_id"].as_str() else { return Ok(()) };
        if let Some(root) = self.store.get_event(root).await?
            && root.room_id == room_id.as_str()
            && serde_json::from_str::<JsonValue>(&root.json).is_ok_and(|pdu| !pdu["content"]["m.relates_to"].is_null())
        {
            return Err(Error::unknown(
                axum::http::StatusCode::BAD_REQUEST,
                "Cannot start a thread from an event that relates to another event",
            ));
        }
        Ok(())
    }

    /// Refuses a threaded receipt whose event is not in the thread it names (400
    /// `M_INVALID_PARAM`): the root itself, or an event whose relations lead to the root
    /// through an `m.thread` relation within three hops, as the spec counts threads.
    /// Receipts for `main` are not checked: clients send them for thread roots and for
    /// events whose thread they have not loaded.
    pub(crate) async fn check_receipt_thread(&self, event_id: &str, thread_id: Option<&str>) -> Result<()> {
        let Some(thread) = thread_id.filter(|t| *t != "main") else { return Ok(()) };
        if thread.is_empty() {
            return Err(Error::invalid_param("thread_id must be a non-empty string"));
        }
        if event_id == thread {
            return Ok(());
        }
        let mut current = event_id.to_owned();
        for _ in 0..3 {
            match self.store.get_relation_parent(&current).await? {
                Some((parent, rel_type)) if rel_type == "m.thread" => {
                    if parent == thread {
                        return Ok(());
                    }
                    break;
                }
                Some((parent, _)) => current = parent,
                None => break,
            }
        }
        Err(Error::invalid_param(format!("{event_id} is not in the thread {thread}")))
    }
}
