//! Pushers and the notifications list: `POST /pushers/set` (HTTP pushers, each tied to
//! the device whose access token set it), `GET /pushers` and `GET /notifications` (the
//! events that notified the user, from the push actions stored with each event). The
//! sending of pushes is `push_sender.rs`.

use std::net::IpAddr;

use http::StatusCode;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, UInt, UserId,
    api::{
        client::push::{
            EmailPusherData, Pusher, PusherIds, PusherInit, PusherKind, get_notifications,
            set_pusher::v3::{PusherAction, PusherPostData},
        },
        error::ErrorKind,
    },
    push::{Action, HighlightTweakValue, HttpPusherData, Tweak},
};

use super::{Services, Session, federation::discovery::is_public, now_ms};
use crate::{
    error::{Error, Result},
    storage::{NotificationRow, PusherRow},
};

/// The path every push gateway URL must have (the push gateway API's one endpoint).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Longest `app_id` (the spec's limit, in characters).
const MAX_APP_ID_CHARS: usize = 64;
/// Longest `pushkey` (the spec's limit, in bytes).
const MAX_PUSHKEY_BYTES: usize = 512;
/// `/notifications` entries per page when the client does not say, and at most.
const DEFAULT_NOTIFICATIONS: u64 = 20;
const MAX_NOTIFICATIONS: u64 = 100;

impl Services {
    /// `POST /pushers/set`: adds, replaces (`kind` given) or deletes (`kind: null`) one
    /// of the user's pushers. Only HTTP pushers are kept: an email pusher needs an email
    /// address bound to the account, which this server does not have.
    pub async fn set_pusher(&self, session: &Session, action: PusherAction) -> Result<()> {
        let user = session.user_id.as_str();
        let PusherPostData { pusher, append, .. } = match action {
            PusherAction::Delete(ids) => {
                if self.store.delete_pusher(user, &ids.app_id, &ids.pushkey).await? {
                    tracing::debug!(user, app_id = %ids.app_id, "pusher deleted");
                    // Its task finds it gone, and ends.
                    self.wake_pushers(std::iter::once(user));
                }
                return Ok(());
            }
            PusherAction::Post(post) => post,
            _ => return Err(Error::invalid_param("Unknown pusher action")),
        };
        let ids = &pusher.ids;
        if ids.app_id.is_empty() || ids.app_id.chars().count() > MAX_APP_ID_CHARS {
            return Err(Error::invalid_param(format!("app_id must be 1 to {MAX_APP_ID_CHARS} characters")));
        }
        if ids.pushkey.is_empty() || ids.pushkey.len() > MAX_PUSHKEY_BYTES {
            return Err(Error::invalid_param(format!("pushkey must be 1 to {MAX_PUSHKEY_BYTES} bytes")));
        }
        let data = match &pusher.kind {
            PusherKind::Http(data) => {
                self.check_gateway_url(&data.url)?;
                serde_json::to_string(data).map_err(Error::internal)?
            }
            PusherKind::Email(_) => {
                return Err(Error::matrix(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::ThreepidNotFound,
                    "An email pusher needs an email address bound to the account; this server has none",
                ));
            }
            _ => return Err(Error::invalid_param("Unknown pusher kind: only \"http\" pushers are supported")),
        };
        let row = PusherRow {
            user_id: user.to_owned(),
            app_id: ids.app_id.clone(),
            pushkey: ids.pushkey.clone(),
            kind: "http".to_owned(),
            app_display_name: pusher.app_display_name.clone(),
            device_display_name: pusher.device_display_name.clone(),
            profile_tag: pusher.profile_tag.clone(),
            lang: pusher.lang.clone(),
            data,
            device_id: session.device_id.to_string(),
            pushkey_ts: now_ms(),
        };
        let max = self.config.push.max_pushers_per_user;
        if !self.store.set_pusher(&row, append, i64::from(max)).await? {
            return Err(Error::forbidden(format!(
                "This account has {max} pushers, the most this server allows: delete one first"
            )));
        }
        self.start_pusher(user, &row.app_id, &row.pushkey);
        Ok(())
    }

    /// A gateway URL must be `http(s)://host[:port]/_matrix/push/v1/notify`; one naming
    /// a private or loopback address is refused unless `push.allow_private_destinations`.
    fn check_gateway_url(&self, url: &str) -> Result<()> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| Error::invalid_param(format!("data.url is not a URL ({e}): {url}")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(Error::invalid_param("data.url must be an https (or http) URL"));
        }
        if parsed.path() != NOTIFY_PATH {
            return Err(Error::invalid_param(format!("data.url must have the path {NOTIFY_PATH}")));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() || parsed.fragment().is_some() {
            return Err(Error::invalid_param("data.url must not hold credentials or a fragment"));
        }
        let Some(host) = parsed.host_str() else {
            return Err(Error::invalid_param("data.url has no host"));
        };
        if !self.config.push.allow_private_destinations && !is_public_host(host) {
            return Err(Error::invalid_param(
                "data.url names a private or loopback address, which this server does not push to",
            ));
        }
        Ok(())
    }

    /// `GET /pushers`: the user's pushers.
    pub async fn get_pushers(&self, user: &UserId) -> Result<Vec<Pusher>> {
        let rows = self.store.get_pushers(user.as_str()).await?;
        let mut pushers = Vec::with_capacity(rows.len());
        for row in rows {
            let kind = match row.kind.as_str() {
                "http" => PusherKind::Http(serde_json::from_str::<HttpPusherData>(&row.data).map_err(Error::internal)?),
                _ => PusherKind::Email(EmailPusherData::new()),
            };
            pushers.push(Pusher::from(PusherInit {
                ids: PusherIds::new(row.pushkey, row.app_id),
                kind,
                app_display_name: row.app_display_name,
                device_display_name: row.device_display_name,
                profile_tag: row.profile_tag,
                lang: row.lang,
            }));
        }
        Ok(pushers)
    }

    /// `GET /notifications`: the events that notified the user, newest first, from the
    /// `from` token on (a stream position this endpoint gave as `next_token`), at most
    /// `limit`, only the highlights with `only=highlight` (another `only` filters nothing).
    pub async fn notifications(
        &self,
        user: &UserId,
        from: Option<&str>,
        limit: Option<UInt>,
        only: Option<&str>,
    ) -> Result<get_notifications::v3::Response> {
        let before = match from.filter(|f| !f.is_empty()) {
            Some(token) => Some(
                token
                    .parse::<i64>()
                    .map_err(|_| Error::invalid_param(format!("from: not a token from /notifications: {token}")))?,
            ),
            None => None,
        };
        let limit = limit.map_or(DEFAULT_NOTIFICATIONS, u64::from).clamp(1, MAX_NOTIFICATIONS) as i64;
        let mut rows =
            self.store.get_notifications(user.as_str(), before, limit + 1, only == Some("highlight")).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let ids: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
        let stored = self.store.get_events_by_ids(&ids).await?;
        let formatted = self.client_events(&stored, None, true).await?;
        let mut events: std::collections::HashMap<&str, (ruma::serde::Raw<ruma::events::AnySyncTimelineEvent>, i64)> =
            stored
                .iter()
                .zip(formatted)
                .map(|(event, json)| (event.event_id.as_str(), (json, event.origin_server_ts)))
                .collect();
        let mut notifications = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some((json, ts)) = events.remove(row.event_id.as_str()) else { continue };
            let room_id = OwnedRoomId::try_from(row.room_id.as_str()).map_err(Error::internal)?;
            let ts = MilliSecondsSinceUnixEpoch(UInt::new(ts.max(0) as u64).unwrap_or_default());
            notifications.push(get_notifications::v3::Notification::new(
                stored_actions(row),
                json,
                row.read,
                room_id,
                ts,
            ));
        }
        let mut response = get_notifications::v3::Response::new(notifications);
        if more {
            response.next_token = rows.last().map(|r| r.stream_pos.to_string());
        }
        Ok(response)
    }
}

/// Whether a URL host (a name, or an IP literal, IPv6 in brackets) may be a public
/// address: IP literals are checked, and `localhost` names are not public. Names are
/// checked again when resolved (`push_sender.rs`).
pub(crate) fn is_public_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return is_public(ip);
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    !(name == "localhost" || name.ends_with(".localhost"))
}

/// The actions stored with a notification; rows stored before actions were kept read
/// as `notify`, with the highlight tweak when they highlighted.
pub(crate) fn stored_actions(row: &NotificationRow) -> Vec<Action> {
    actions_or_default(row.actions.as_deref(), row.highlight != 0)
}

pub(crate) fn actions_or_default(actions: Option<&str>, highlight: bool) -> Vec<Action> {
    if let Some(actions) = actions.and_then(|a| serde_json::from_str::<Vec<Action>>(a).ok()) {
        return actions;
    }
    let mut actions = vec![Action::Notify];
    if highlight {
        actions.push(Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes)));
    }
    actions
}
