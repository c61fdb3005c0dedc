//! Joining across servers. As the resident server: `make_join` answers a template of a
//! remote user's join built on the room's current head, and `send_join` takes the signed
//! join through the event pipeline and answers the state before it with its auth chain.
//! As the joining server: `join_remote_room` asks a resident server for a template,
//! signs it, sends it, checks and stores the returned state and auth chain as outliers,
//! and places the join on top of that state.

use std::collections::{BTreeSet, HashMap};

use axum::http::StatusCode;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
    api::{
        error::{ErrorKind, IncompatibleRoomVersionErrorData},
        federation::membership::{
            create_join_event::v2 as send_join, create_leave_event::v2 as send_leave,
            prepare_join_event::v1 as make_join, prepare_leave_event::v1 as make_leave,
        },
    },
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde_json::{json, value::RawValue};

use crate::{
    error::{Error, Result},
    service::{
        SUPPORTED_ROOM_VERSIONS, Services, now_ms,
        rooms::{
            append::{LocalEvent, rules_for},
            build::{StateMap, auth_state_keys},
            pdu::Pdu,
            pipeline::{Arrival, PduOutcome},
            restricted::AUTHORISED_VIA,
        },
    },
};

/// Most events of a `send_join` answer's state and auth chain taken in.
const MAX_JOIN_EVENTS: usize = 200_000;
/// Most events read for the auth chain of a `send_join` answer.
const MAX_AUTH_CHAIN: i64 = 200_000;

pub(super) fn to_raw(object: &CanonicalJsonObject) -> Result<Box<RawValue>> {
    RawValue::from_string(serde_json::to_string(object).map_err(Error::internal)?).map_err(Error::internal)
}

pub(super) fn parse_object(raw: &RawValue) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(format!("An event is not canonical JSON: {e}")))
}

pub(super) fn event_id_of(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId> {
    let hash = ruma::signatures::reference_hash(object, rules)
        .map_err(|e| Error::bad_json(format!("Cannot compute an event id: {e}")))?;
    OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)
}

pub(super) fn str_field<'a>(object: &'a CanonicalJsonObject, key: &str) -> Option<&'a str> {
    object.get(key).and_then(|v| v.as_str())
}

/// Checks that `object` is `user`'s own `membership` event in `room_id`.
fn check_membership_event(object: &CanonicalJsonObject, room_id: &RoomId, user: &str, wanted: &str) -> Result<()> {
    let membership = match object.get("content") {
        Some(CanonicalJsonValue::Object(content)) => content.get("membership").and_then(|m| m.as_str()),
        _ => None,
    };
    if str_field(object, "type") != Some("m.room.member")
        || str_field(object, "room_id") != Some(room_id.as_str())
        || str_field(object, "sender") != Some(user)
        || str_field(object, "state_key") != Some(user)
        || membership != Some(wanted)
    {
        return Err(Error::bad_json(format!("Not a {wanted} of {user} in {room_id}")));
    }
    Ok(())
}

impl Services {
    /// `GET /make_join/{roomId}/{userId}`: a join template for a user of `origin`, built
    /// on the room's current head and checked against its auth rules (a banned user, or
    /// one the join rules keep out, gets `M_FORBIDDEN`).
    pub async fn make_join_template(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
        versions: &[RoomVersionId],
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.membership_template(origin, room_id, user, "join", Some(versions)).await
    }

    /// A template of `user`'s own `membership` event (join, leave, knock) for their
    /// server `origin`, built on the room's head and checked; `versions` are the room
    /// versions the asking server supports, when it says.
    pub(super) async fn membership_template(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
        membership: &str,
        versions: Option<&[RoomVersionId]>,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        if user.server_name() != origin {
            return Err(Error::forbidden("A server may only ask for its own users"));
        }
        let version = self.room_version(room_id).await?;
        self.require_server_allowed(room_id, origin).await?;
        if self.joined_local_members(room_id).await?.is_empty() {
            return Err(Error::not_found("This server is not in that room"));
        }
        if versions.is_some_and(|v| !v.contains(&version)) {
            return Err(Error::matrix(
                StatusCode::BAD_REQUEST,
                ErrorKind::IncompatibleRoomVersion(IncompatibleRoomVersionErrorData::new(version.clone())),
                format!("The room has version {version}, which the asking server does not support"),
            ));
        }
        let rules = rules_for(&version)?;
        if membership == "knock" && !rules.authorization.knocking {
            return Err(Error::matrix(
                StatusCode::BAD_REQUEST,
                ErrorKind::IncompatibleRoomVersion(IncompatibleRoomVersionErrorData::new(version.clone())),
                format!("Room version {version} does not support knocking"),
            ));
        }
        let mut content = json!({ "membership": membership });
        if membership == "join"
            && let Some(via) = self.restricted_join_authoriser(room_id, user).await?
        {
            // A restricted room the user may join: one of our members vouches.
            content[AUTHORISED_VIA] = json!(via);
        }
        let event = LocalEvent {
            sender: user,
            kind: TimelineEventType::RoomMember,
            state_key: Some(user.to_string()),
            content,
            txn: None,
            redacts: None,
        };
        let built = self.build_on_current_state(room_id, &rules, &event).await?;
        let mut template: CanonicalJsonObject = serde_json::from_str(&built.json).map_err(Error::internal)?;
        // The asking server hashes and signs it.
        template.remove("signatures");
        template.remove("hashes");
        Ok((version, to_raw(&template)?))
    }

    /// Builds `event` on the room's current head and state without storing it.
    pub(crate) async fn build_on_current_state(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        event: &LocalEvent<'_>,
    ) -> Result<crate::service::rooms::build::BuiltEvent> {
        let keys = auth_state_keys(event, rules)?;
        let head = {
            let _guard = self.room_locks.lock(room_id).await;
            self.room_head(room_id, rules).await?
        };
        let mut prev = head.extremities.clone();
        prev.sort_by_key(|e| std::cmp::Reverse(e.1));
        prev.truncate(10);
        let keys: Vec<(String, String)> = keys.into_iter().map(|(t, k)| (t.to_string(), k)).collect();
        let mut state = StateMap::new();
        for stored in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
            let pdu = Pdu::from_stored(&stored)?;
            state.insert((stored.event_type.as_str().into(), stored.state_key.clone().unwrap_or_default()), pdu);
        }
        self.build_event(room_id, rules, &prev, event, &state)
    }

    /// `PUT /send_join/{roomId}/{eventId}` (v2): takes a remote user's signed join through
    /// the event pipeline and answers the state before it and the auth chain of that
    /// state and the join.
    pub async fn accept_send_join(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        pdu: &RawValue,
    ) -> Result<send_join::RoomState> {
        let started = std::time::Instant::now();
        let signed = self.accept_membership(origin, room_id, event_id, pdu, "join").await?;
        let accepted_ms = started.elapsed().as_millis() as u64;
        let stored =
            self.store.get_event(event_id.as_str()).await?.ok_or_else(|| Error::internal("the join vanished"))?;
        let group = self.state_group_before(&stored).await?.ok_or_else(|| Error::internal("no state before"))?;
        let state = self.state_events_at(group).await?;
        let mut chain_of: Vec<String> = state.iter().map(|e| e.event_id.clone()).collect();
        chain_of.push(event_id.to_string());
        let chain_ids = self.store.get_auth_chain(&chain_of, MAX_AUTH_CHAIN).await?;
        let chain = self.store.get_events_by_ids(&chain_ids).await?;
        let mut room_state = send_join::RoomState::new();
        for event in &state {
            room_state.state.push(RawValue::from_string(event.json.clone()).map_err(Error::internal)?);
        }
        for event in &chain {
            room_state.auth_chain.push(RawValue::from_string(event.json.clone()).map_err(Error::internal)?);
        }
        let mut servers: Vec<String> = self.room_remote_servers(room_id).await?.iter().map(|s| s.to_string()).collect();
        servers.push(self.server_name().to_string());
        servers.sort();
        room_state.servers_in_room = Some(servers);
        if let Some(signed) = signed {
            // A restricted join we vouched for: the joining server needs our signature.
            room_state.event = Some(to_raw(&signed)?);
        }
        tracing::debug!(%room_id, %origin, state = room_state.state.len(), auth_chain = room_state.auth_chain.len(),
            accept_ms = accepted_ms, total_ms = started.elapsed().as_millis() as u64, "answered a send_join");
        Ok(room_state)
    }

    /// Joins `user` to a room this server is not in, through the first of `via` that
    /// answers (see the module comment). Answers the join's event id.
    pub async fn join_remote_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<OwnedEventId> {
        let started = std::time::Instant::now();
        let (resident, template) = self
            .first_template(via, "join", || {
                let mut request = make_join::Request::new(room_id.to_owned(), user.to_owned());
                request.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
                request
            })
            .await?;
        let version = template.room_version.unwrap_or(RoomVersionId::V1);
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(Error::matrix(
                StatusCode::BAD_REQUEST,
                ErrorKind::IncompatibleRoomVersion(IncompatibleRoomVersionErrorData::new(version.clone())),
                format!("The room has version {version}, which this server does not support"),
            ));
        }
        let rules = rules_for(&version)?;
        let extra = self.own_membership_extra(user, reason).await?;
        let (event_id, mut event) = self.sign_template(&template.event, room_id, user, "join", &rules, extra)?;
        let make_join_ms = started.elapsed().as_millis() as u64;
        let request = send_join::Request::new(room_id.to_owned(), event_id.clone(), to_raw(&event)?);
        let answer = self.send_federation_request(&resident, request).await?.room_state;
        let send_join_ms = started.elapsed().as_millis() as u64 - make_join_ms;
        let (state_len, chain_len) = (answer.state.len(), answer.auth_chain.len());
        if let Some(signed) = &answer.event {
            // A restricted join comes back signed by the resident too.
            let signed = parse_object(signed)?;
            if event_id_of(&signed, &rules)? == event_id {
                event = signed;
            }
        }
        let [outliers_ms, state_group_ms, join_event_ms] =
            self.store_joined_state(room_id, &version, &rules, answer, event).await?;
        tracing::info!(%room_id, %resident, state = state_len, auth_chain = chain_len, make_join_ms, send_join_ms,
            outliers_ms, state_group_ms, join_event_ms, total_ms = started.elapsed().as_millis() as u64,
            "joined a remote room");
        Ok(event_id)
    }

    /// Stores a `send_join` answer: the room, its state and auth chain as outliers (each
    /// checked), the state as a group, and our join on top of it as the room's head.
    /// Answers how long each of the three took, in milliseconds.
    async fn store_joined_state(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        rules: &RoomVersionRules,
        answer: send_join::RoomState,
        join: CanonicalJsonObject,
    ) -> Result<[u64; 3]> {
        let started = std::time::Instant::now();
        let lap = || started.elapsed().as_millis() as u64;
        if answer.state.len() + answer.auth_chain.len() > MAX_JOIN_EVENTS {
            return Err(Error::federation("The room's state is too large to join"));
        }
        let mut outliers: Vec<CanonicalJsonObject> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut state_ids = BTreeSet::new();
        for (raw, is_state) in
            answer.auth_chain.iter().map(|r| (r, false)).chain(answer.state.iter().map(|r| (r, true)))
        {
            let object = parse_object(raw)?;
            let id = event_id_of(&object, rules)?;
            if is_state {
                state_ids.insert(id.clone());
            }
            if seen.insert(id) {
                outliers.push(object);
            }
        }
        let creator = outliers
            .iter()
            .find(|o| str_field(o, "type") == Some("m.room.create"))
            .and_then(|o| str_field(o, "sender"))
            .ok_or_else(|| Error::federation("The room's state has no create event"))?
            .to_owned();
        let creator = UserId::parse(&creator).map_err(|e| Error::federation(format!("Bad room creator: {e}")))?;
        self.ensure_remote_room(room_id, version, &creator).await?;

        let outcomes = self.handle_outliers(room_id, version, outliers).await?;
        let outliers_ms = lap();
        let mut accepted: BTreeSet<OwnedEventId> = BTreeSet::new();
        for outcome in outcomes {
            match outcome {
                Ok(PduOutcome::Accepted { event_id, .. } | PduOutcome::Duplicate { event_id }) => {
                    accepted.insert(event_id);
                }
                Ok(other) => tracing::info!(%room_id, ?other, "an event of a join's state was not accepted"),
                Err(e) => tracing::info!(%room_id, error = %e, "an event of a join's state was refused"),
            }
        }
        // The state: the accepted state events, by type and key.
        let state_events = self
            .store
            .get_events_by_ids(
                &state_ids.iter().filter(|id| accepted.contains(*id)).map(|id| id.to_string()).collect::<Vec<_>>(),
            )
            .await?;
        let mut state: HashMap<(String, String), String> = HashMap::new();
        for e in &state_events {
            if let Some(key) = &e.state_key {
                state.insert((e.event_type.clone(), key.clone()), e.event_id.clone());
            }
        }
        if !state.contains_key(&("m.room.create".to_owned(), String::new())) {
            return Err(Error::federation("The room's create event did not pass the checks"));
        }
        let mut entries: Vec<(String, String, String)> =
            state.iter().map(|((t, k), id)| (t.clone(), k.clone(), id.clone())).collect();
        entries.sort();
        let group = self.store_state_group(room_id, &entries).await?;
        let state_group_ms = lap() - outliers_ms;

        // Our join, checked against that state like any PDU, becomes the room's head.
        match self.handle_join_pdu(room_id, version, join, group).await? {
            PduOutcome::Accepted { .. } | PduOutcome::Duplicate { .. } => {}
            PduOutcome::Rejected { reason, .. } => {
                return Err(Error::forbidden(format!("The room's state does not allow the join: {reason}")));
            }
            PduOutcome::SoftFailed { .. } => return Err(Error::forbidden("The room's state does not allow the join")),
        }
        Ok([outliers_ms, state_group_ms, lap() - outliers_ms - state_group_ms])
    }
}

impl Services {
    /// `GET /make_leave/{roomId}/{userId}`: a leave template for a user of `origin` (to
    /// decline an invite, or to leave), built on the room's head and checked.
    pub async fn make_leave_template(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.membership_template(origin, room_id, user, "leave", None).await
    }

    /// `PUT /send_leave/{roomId}/{eventId}` (v2): a remote user's signed leave, through
    /// the event pipeline, then on to the room's other servers.
    pub async fn accept_send_leave(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        pdu: &RawValue,
    ) -> Result<()> {
        self.accept_membership(origin, room_id, event_id, pdu, "leave").await.map(|_| ())
    }

    /// A remote user's own signed `membership` event (join, leave, knock) sent by its
    /// server: checked, through the event pipeline, then passed on to the room's other
    /// servers. A restricted join that names one of our members as its voucher is
    /// signed by us first (when the user may join: see `restricted.rs`), and answered.
    pub(super) async fn accept_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        pdu: &RawValue,
        membership: &str,
    ) -> Result<Option<CanonicalJsonObject>> {
        let version = self.room_version(room_id).await?;
        self.require_server_allowed(room_id, origin).await?;
        let rules = rules_for(&version)?;
        let mut object = parse_object(pdu)?;
        let sender = str_field(&object, "sender").unwrap_or_default().to_owned();
        check_membership_event(&object, room_id, &sender, membership)?;
        let sender_id = UserId::parse(&sender).map_err(|e| Error::bad_json(format!("Bad sender: {e}")))?;
        if sender_id.server_name() != origin {
            return Err(Error::forbidden("A server may only send its own users' membership"));
        }
        if event_id_of(&object, &rules)? != event_id {
            return Err(Error::bad_json("The event id does not match the event"));
        }
        let mut signed = None;
        if membership == "join" && self.vouched_here(&object) {
            if self.restricted_join_authoriser(room_id, &sender_id).await?.is_none() {
                return Err(Error::forbidden("The join names a voucher, but the room's join rules need none"));
            }
            ruma::signatures::sign_event(self.server_name().as_str(), &self.signing_key, &mut object, &rules.redaction)
                .map_err(|e| Error::internal(format!("cannot sign the join: {e}")))?;
            signed = Some(object.clone());
        }
        match self.handle_pdu(room_id, &version, object, Arrival::Live).await? {
            PduOutcome::Accepted { position, .. } => {
                // The other servers in the room hear of it from us.
                if let Some(position) = position {
                    let others: Vec<OwnedServerName> =
                        self.room_remote_servers(room_id).await?.iter().filter(|s| *s != origin).cloned().collect();
                    self.send_pdu(&others, position, event_id.as_str()).await?;
                }
                Ok(signed)
            }
            PduOutcome::Duplicate { .. } => Ok(signed),
            PduOutcome::Rejected { reason, .. } => {
                Err(Error::forbidden(format!("The {membership} is not allowed: {reason}")))
            }
            PduOutcome::SoftFailed { .. } => {
                Err(Error::forbidden(format!("The {membership} is not allowed by the room's current state")))
            }
        }
    }

    /// Leaves a room this server is not in (declines an invite, retracts a knock)
    /// through the first of `servers` that answers: `make_leave`, sign, `send_leave`.
    /// Answers the leave's id and the signed event.
    pub async fn leave_remote_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        servers: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let (server, template) = self
            .first_template(servers, "leave", || make_leave::Request::new(room_id.to_owned(), user.to_owned()))
            .await?;
        let version = template.room_version.unwrap_or(RoomVersionId::V1);
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(Error::federation(format!("{server} answered room version {version}")));
        }
        let rules = rules_for(&version)?;
        let mut extra = serde_json::Map::new();
        if let Some(reason) = reason {
            extra.insert("reason".into(), json!(reason));
        }
        let (event_id, event) = self.sign_template(&template.event, room_id, user, "leave", &rules, extra)?;
        let request = send_leave::Request::new(room_id.to_owned(), event_id.clone(), to_raw(&event)?);
        self.send_federation_request(&server, request).await?;
        Ok((event_id, event))
    }
}

impl Services {
    /// Whether a join names a user of this server as its voucher (a restricted join).
    fn vouched_here(&self, join: &CanonicalJsonObject) -> bool {
        let via = match join.get("content") {
            Some(CanonicalJsonValue::Object(content)) => content.get(AUTHORISED_VIA).and_then(|v| v.as_str()),
            _ => None,
        };
        via.and_then(|v| UserId::parse(v).ok()).is_some_and(|u| u.server_name() == self.server_name())
    }

    /// What a user's own join or knock carries besides the membership: the reason
    /// given, and the user's profile (clients show members by it).
    pub(super) async fn own_membership_extra(
        &self,
        user: &UserId,
        reason: Option<String>,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut extra = serde_json::Map::new();
        if let Some(reason) = reason {
            extra.insert("reason".into(), json!(reason));
        }
        if let Some(profile) = self.store.get_profile(user.as_str()).await? {
            for field in ["displayname", "avatar_url"] {
                if let Some(value @ serde_json::Value::String(_)) = profile.get(field) {
                    extra.insert(field.into(), value.clone());
                }
            }
        }
        Ok(extra)
    }

    /// Asks `servers` in turn (this one left out) for a template of a `what` (join,
    /// knock) with the request `ask` makes for each, and answers the first server that
    /// gave one, with its answer. When none did: `M_NOT_FOUND` if there was no server
    /// to ask; the last server's refusal (a 4xx: banned, not allowed, wrong room
    /// version) relayed, naming every server's answer; else `502`.
    pub(super) async fn first_template<T>(
        &self,
        servers: &[OwnedServerName],
        what: &str,
        ask: impl Fn() -> T,
    ) -> Result<(OwnedServerName, T::IncomingResponse)>
    where
        T: ruma::api::OutgoingRequest<
                EndpointError = ruma::api::error::Error,
                PathBuilder = ruma::api::path_builder::SinglePath,
            > + Send,
        T::Authentication: super::client::OutboundAuth,
    {
        let mut tried = Vec::new();
        let mut last_refusal: Option<Error> = None;
        for server in servers.iter().filter(|s| *s != self.server_name()) {
            match self.send_federation_request(server, ask()).await {
                Ok(response) => return Ok((server.clone(), response)),
                Err(e) => {
                    let e = e.relayed();
                    tracing::info!(%server, error = %e, "make_{what} failed");
                    tried.push(format!("{server}: {}", e.message()));
                    if matches!(&e, Error::Matrix { status, .. } if status.is_client_error()) {
                        last_refusal = Some(e);
                    } else {
                        last_refusal = None;
                    }
                }
            }
        }
        Err(match (tried.is_empty(), last_refusal) {
            (true, _) => {
                Error::not_found(format!("No server to {what} this room through: give one (via or server_name)"))
            }
            // Refused (not unreachable) by the last server tried: its answer, with all of them.
            (false, Some(Error::Matrix { status, kind, .. })) => {
                Error::matrix(status, kind, format!("No server let us {what}: {}", tried.join("; ")))
            }
            (false, _) => Error::federation(format!("No server let us {what}: {}", tried.join("; "))),
        })
    }

    /// Fills in a resident server's template of `user`'s own `membership` event: checks
    /// it is that, adds `extra` to its content and the time, hashes and signs it.
    /// Answers its id and the signed event.
    pub(super) fn sign_template(
        &self,
        template: &RawValue,
        room_id: &RoomId,
        user: &UserId,
        membership: &str,
        rules: &RoomVersionRules,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let mut event = parse_object(template)?;
        check_membership_event(&event, room_id, user.as_str(), membership)?;
        for key in ["signatures", "hashes", "event_id", "unsigned"] {
            event.remove(key);
        }
        event.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(now_ms().try_into().unwrap_or_default()));
        if let Some(CanonicalJsonValue::Object(content)) = event.get_mut("content") {
            for (key, value) in extra {
                if let Ok(value) = CanonicalJsonValue::try_from(value) {
                    content.insert(key, value);
                }
            }
        }
        ruma::signatures::hash_and_sign_event(
            self.server_name().as_str(),
            &self.signing_key,
            &mut event,
            &rules.redaction,
        )
        .map_err(|e| Error::internal(format!("cannot sign the {membership}: {e}")))?;
        Ok((event_id_of(&event, rules)?, event))
    }
}

/// The servers to try for joining `room_id`: those given, then the room id's own
/// server (room versions before 12 name one).
pub fn join_candidates(room_id: &RoomId, via: &[OwnedServerName]) -> Vec<OwnedServerName> {
    let mut servers: Vec<OwnedServerName> = via.to_vec();
    if let Some(server) = room_id.server_name()
        && !servers.iter().any(|s| s == server)
    {
        servers.push(server.to_owned());
    }
    servers
}
