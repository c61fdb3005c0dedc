//! Redactions from other servers (room versions 3 and up). The auth rules let any
//! member's redaction through; it is applied only when its sender's server is the
//! target's sender's server, or its sender has the room's `redact` power level in the
//! state before the redaction. A redaction whose target is not here yet is held
//! (`pending_redactions`) and applied, on the same rule, when the target arrives: live,
//! by backfill or as an outlier. A redaction that does not apply is kept (and shown)
//! as an event; only its target's content is untouched.

use ruma::{RoomId, UserId, room_version_rules::RoomVersionRules};
use serde_json::{Value as JsonValue, json};

use super::{IdState, place::Before};
use crate::service::rooms::{messages::user_power_level, pdu::Pdu};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::StoredEvent,
};

/// What a redaction does, decided before it is stored.
pub(crate) enum RedactionPlan {
    /// Its target is here and it applies: the target's redacted JSON.
    Apply { target: String, redacted_json: String },
    /// Its target is not here yet.
    Hold { target: String },
}

/// The state a redaction's power is read in.
enum StateAt<'a> {
    Group(i64),
    Ids(&'a IdState),
}

const POWER_KEYS: [(&str, &str); 2] = [("m.room.power_levels", ""), ("m.room.create", "")];

impl Services {
    /// What an accepted redaction (`redaction`, with `before` the state before it) does
    /// to its target `target`: applied, held until the target comes, or nothing (the
    /// target is in another room, already redacted, or the sender may not redact it).
    pub(super) async fn plan_redaction(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        redaction: &Pdu,
        target: &str,
        before: &Before,
    ) -> Result<Option<RedactionPlan>> {
        let Some(stored) = self.store.get_event(target).await? else {
            return Ok(Some(RedactionPlan::Hold { target: target.to_owned() }));
        };
        if stored.room_id != room_id.as_str() || stored.redacted_by.is_some() {
            return Ok(None);
        }
        let state = match before {
            Before::Group(group) => StateAt::Group(*group),
            Before::Resolved(state) => StateAt::Ids(state),
        };
        if !self.redaction_applies(rules, &redaction.sender, &stored.sender, state).await? {
            tracing::info!(redaction = %redaction.event_id, target, "a redaction by someone without the power to redact another server's event is not applied");
            return Ok(None);
        }
        Ok(self
            .redacted_json_of(target, room_id, rules)
            .await?
            .map(|(target, redacted_json)| RedactionPlan::Apply { target, redacted_json }))
    }

    /// The held redaction that applies to `target` (an event of `room_id` about to be
    /// stored, sent by `sender`, as `json`), if any: (its id, the target's redacted
    /// JSON). Held redactions that do not apply are forgotten.
    pub(super) async fn held_redaction_for(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        target: &str,
        sender: &UserId,
        json: &str,
    ) -> Result<Option<(String, String)>> {
        let held = self.store.get_held_redactions(&[target.to_owned()]).await?;
        if held.is_empty() {
            return Ok(None);
        }
        for (_, redaction_id) in &held {
            if let Some(redaction) = self.store.get_event(redaction_id).await?
                && self.held_redaction_applies(room_id, rules, &redaction, sender).await?
            {
                return Ok(Some((redaction.event_id, redacted(json, rules)?)));
            }
        }
        self.store.apply_held_redaction(target, None).await?;
        Ok(None)
    }

    /// Applies the redactions held for any of these events, just stored as outliers.
    pub(super) async fn apply_held_redactions(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        event_ids: &[String],
    ) -> Result<()> {
        let held = self.store.get_held_redactions(event_ids).await?;
        let mut targets: Vec<&str> = held.iter().map(|(target, _)| target.as_str()).collect();
        targets.dedup();
        for target in targets {
            let Some(event) = self.store.get_event(target).await? else { continue };
            let sender = UserId::parse(&event.sender).map_err(Error::internal)?;
            let applied = self.held_redaction_for(room_id, rules, target, &sender, &event.json).await?;
            if let Some((by, redacted_json)) = &applied {
                self.store.apply_held_redaction(target, Some((by, redacted_json))).await?;
            }
        }
        Ok(())
    }

    /// Whether a stored redaction, held for a target of `target_sender`, applies: it is
    /// an accepted event of the room, and the rule holds in the state before it.
    async fn held_redaction_applies(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        redaction: &StoredEvent,
        target_sender: &UserId,
    ) -> Result<bool> {
        if redaction.room_id != room_id.as_str() || redaction.rejected_reason.is_some() || redaction.state_group == 0 {
            return Ok(false);
        }
        let sender = UserId::parse(&redaction.sender).map_err(Error::internal)?;
        // A redaction is not a state event: its group is the state before it.
        self.redaction_applies(rules, &sender, target_sender.as_str(), StateAt::Group(redaction.state_group)).await
    }

    /// The rule: same server as the target's sender, or the `redact` power level in
    /// `state` (the state before the redaction).
    async fn redaction_applies(
        &self,
        rules: &RoomVersionRules,
        sender: &UserId,
        target_sender: &str,
        state: StateAt<'_>,
    ) -> Result<bool> {
        if UserId::parse(target_sender).is_ok_and(|t| t.server_name() == sender.server_name()) {
            return Ok(true);
        }
        let keys: Vec<(String, String)> = POWER_KEYS.iter().map(|(t, k)| (t.to_string(), k.to_string())).collect();
        let ids: Vec<String> = match state {
            StateAt::Group(group) => {
                self.store.get_state_group_entries(group, &keys).await?.into_iter().map(|e| e.2).collect()
            }
            StateAt::Ids(state) => keys.iter().filter_map(|k| state.get(k).cloned()).collect(),
        };
        let events = self.store.get_events_by_ids(&ids).await?;
        let Some(create) = events.iter().find(|e| e.event_type == "m.room.create") else { return Ok(false) };
        let pl = match events.iter().find(|e| e.event_type == "m.room.power_levels") {
            Some(e) => serde_json::from_str::<JsonValue>(&e.json).map_err(Error::internal)?["content"].take(),
            None => json!({}),
        };
        let needed = pl["redact"].as_i64().unwrap_or(50);
        Ok(user_power_level(create, &pl, sender, rules)? >= needed)
    }
}

/// The redacted form of an event's JSON.
fn redacted(json: &str, rules: &RoomVersionRules) -> Result<String> {
    let object: ruma::CanonicalJsonObject = serde_json::from_str(json).map_err(Error::internal)?;
    let redacted = ruma::canonical_json::redact(object, &rules.redaction, None).map_err(Error::internal)?;
    serde_json::to_string(&redacted).map_err(Error::internal)
}
