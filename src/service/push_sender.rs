//! The HTTP pusher: sends each queued push (`push_queue`, written in the notifying
//! event's own transaction, or after a read receipt for an updated badge count) to its
//! pusher's push gateway (`POST {data.url}`, the push gateway API), oldest first. Each
//! pusher has its own task, so a slow or dead gateway delays only its own pushes. Every
//! request has a timeout; a failure is retried with exponential backoff
//! (`push.retry_initial_ms` doubling to `push.max_retry_interval_ms`), and a push
//! that failed `push.max_attempts` times, or that the gateway refuses outright (a
//! `4xx` other than `408` and `429`), is dropped with a warning. A pusher whose gateway
//! answers `rejected: [pushkey]` is deleted. The queue survives restarts: the tasks
//! start again with the server.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ruma::{
    OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, SecondsSinceUnixEpoch, UInt,
    api::IncomingResponseExt,
    api::push_gateway::send_event_notification::v1::{
        Device, Notification, NotificationCounts, NotificationPriority, PusherData, Response as NotifyResponse,
    },
    events::TimelineEventType,
    push::{Action, PushFormat, Tweak},
};
use serde_json::{Value as JsonValue, json, value::RawValue};
use tokio::sync::Notify;

use super::{Services, federation::discovery::is_public, pushers::actions_or_default};
use crate::{
    config::Push as PushConfig,
    error::{Error, Result},
    storage::{PusherRow, QueuedPush},
};

/// Pushes read from a pusher's queue at a time.
const QUEUE_BATCH: i64 = 20;
/// Largest gateway answer read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// (user, app id, pushkey): a pusher.
type PusherKey = (String, String, String);
/// The running pusher tasks of a user, by (app id, pushkey).
type UserTasks = HashMap<(String, String), Arc<PusherTask>>;

/// The senders of all pushers, by user.
pub struct PushSender {
    services: Mutex<Weak<Services>>,
    tasks: Mutex<HashMap<String, UserTasks>>,
    http: reqwest::Client,
    allow_private: bool,
}

/// One pusher's task: a wake-up for new pushes, and whether it has ended.
struct PusherTask {
    wake: Notify,
    ended: AtomicBool,
}

/// What a gateway did with a push.
enum Sent {
    Delivered,
    /// It answered that the pushkey is not valid: the pusher goes.
    Rejected,
    /// It refused the push for good (or it cannot be sent): the push goes.
    Refused(String),
}

/// Looks gateway host names up, keeping only public addresses unless
/// `push.allow_private_destinations` (IP literals are checked before sending).
#[derive(Clone)]
struct PublicOnly {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no public address (push.allow_private_destinations is off)").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl PushSender {
    pub fn new(config: &PushConfig) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = super::federation::client::system_roots();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("push TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(PublicOnly { allow_private: config.allow_private_destinations })
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Convo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("push client: {e}"))?;
        Ok(Self {
            services: Mutex::new(Weak::new()),
            tasks: Mutex::default(),
            http,
            allow_private: config.allow_private_destinations,
        })
    }
}

impl Services {
    /// Starts the task of every HTTP pusher (each sends what is still queued). Called
    /// once the server is up.
    pub async fn start_push_sender(self: &Arc<Self>) -> Result<()> {
        *self.push_sender.services.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(self);
        for (user, app_id, pushkey) in self.store.get_all_http_pushers().await? {
            self.start_pusher(&user, &app_id, &pushkey);
        }
        Ok(())
    }

    /// Before a read receipt is stored: the user's unread count, if the user has pushers
    /// (their badges are updated when it goes down).
    pub(crate) async fn unread_for_badge(&self, user: &ruma::UserId) -> Option<i64> {
        match self.store.has_http_pushers(user.as_str()).await {
            Ok(true) => self.store.count_unread_for_push(user.as_str()).await.ok().map(|c| c.0),
            _ => None,
        }
    }

    /// After a read receipt (at stream position `position`): if the unread count went
    /// down, a push with the new count goes to each of the user's pushers.
    pub(crate) async fn push_badge_after_read(&self, user: &ruma::UserId, before: Option<i64>, position: i64) {
        let Some(before) = before else { return };
        let result = async {
            let (after, _) = self.store.count_unread_for_push(user.as_str()).await?;
            if after < before && self.store.enqueue_badge_pushes(user.as_str(), position).await? {
                self.wake_pushers(std::iter::once(user.as_str()));
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%user, error = %e, "could not queue a badge update");
        }
    }

    /// Wakes the pushers of users whose pushes were just queued.
    pub(crate) fn wake_pushers<'a>(&self, users: impl Iterator<Item = &'a str>) {
        let tasks = self.push_sender.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.is_empty() {
            return;
        }
        for user in users {
            for task in tasks.get(user).into_iter().flat_map(|t| t.values()) {
                task.wake.notify_one();
            }
        }
    }

    /// Wakes the pushers of the room's local members (an event's template rows queued
    /// pushes for members not named one by one).
    pub(crate) fn wake_room_pushers(&self, room_id: &ruma::RoomId) {
        let tasks = self.push_sender.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.is_empty() {
            return;
        }
        let members = self.push_members_cache.members_of(room_id);
        for (user, user_tasks) in tasks.iter() {
            // Not cached: every pusher looks (it finds nothing new if it has nothing).
            if members.as_ref().is_none_or(|m| m.has(user)) {
                user_tasks.values().for_each(|task| task.wake.notify_one());
            }
        }
    }

    /// Wakes a pusher's task, starting it if it is not running.
    pub(crate) fn start_pusher(&self, user: &str, app_id: &str, pushkey: &str) {
        let mut tasks = self.push_sender.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let ids = (app_id.to_owned(), pushkey.to_owned());
        if let Some(task) = tasks.get(user).and_then(|t| t.get(&ids))
            && !task.ended.load(Ordering::Acquire)
        {
            task.wake.notify_one();
            return;
        }
        let Some(services) = self.push_sender.services.lock().unwrap_or_else(|e| e.into_inner()).upgrade() else {
            // Not started yet: `start_push_sender` starts every pusher.
            return;
        };
        let task = Arc::new(PusherTask { wake: Notify::new(), ended: AtomicBool::new(false) });
        tasks.entry(user.to_owned()).or_default().insert(ids, task.clone());
        let key: PusherKey = (user.to_owned(), app_id.to_owned(), pushkey.to_owned());
        tokio::spawn(async move {
            tokio::select! {
                _ = services.shutdown_started() => {}
                _ = services.run_pusher(&key, &task) => {
                    services.end_pusher_task(&key, &task).await;
                }
            }
        });
    }

    /// A pusher's task ended (its pusher is gone): it leaves the map. If the pusher was
    /// set again meanwhile, a new task starts.
    async fn end_pusher_task(&self, key: &PusherKey, task: &Arc<PusherTask>) {
        {
            let mut tasks = self.push_sender.tasks.lock().unwrap_or_else(|e| e.into_inner());
            task.ended.store(true, Ordering::Release);
            if let Some(of_user) = tasks.get_mut(&key.0) {
                let ids = (key.1.clone(), key.2.clone());
                if of_user.get(&ids).is_some_and(|t| Arc::ptr_eq(t, task)) {
                    of_user.remove(&ids);
                }
                if of_user.is_empty() {
                    tasks.remove(&key.0);
                }
            }
        }
        if let Ok(Some(_)) = self.store.get_pusher(&key.0, &key.1, &key.2).await {
            self.start_pusher(&key.0, &key.1, &key.2);
        }
    }

    /// A pusher's task: sends its queue oldest first, waits for more, backs off on a
    /// failure. Ends when the pusher is gone.
    async fn run_pusher(&self, key: &PusherKey, task: &PusherTask) {
        let config = &self.config.push;
        let first_retry = Duration::from_millis(config.retry_initial_ms);
        let max_retry = Duration::from_millis(config.max_retry_interval_ms).max(first_retry);
        let mut retry = first_retry;
        let (user, app_id, pushkey) = (key.0.as_str(), key.1.as_str(), key.2.as_str());
        loop {
            let read = async {
                let pusher = self.store.get_pusher(user, app_id, pushkey).await?;
                let queued = match &pusher {
                    Some(_) => self.store.get_queued_pushes(user, app_id, pushkey, QUEUE_BATCH).await?,
                    None => Vec::new(),
                };
                Ok::<_, Error>((pusher, queued))
            };
            let (pusher, queued) = match read.await {
                Ok((Some(pusher), queued)) => (pusher, queued),
                Ok((None, _)) => return,
                Err(e) => {
                    tracing::warn!(user, app_id, error = %e, "cannot read a push queue");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            if queued.is_empty() {
                task.wake.notified().await;
                continue;
            }
            for push in queued {
                let outcome = self.send_push(&pusher, &push).await;
                match outcome {
                    Ok(Sent::Delivered) => retry = first_retry,
                    Ok(Sent::Rejected) => {
                        tracing::info!(user, app_id, "the push gateway rejected the pushkey: deleting the pusher");
                        if let Err(e) = self.store.delete_pusher(user, app_id, pushkey).await {
                            tracing::warn!(user, app_id, error = %e, "cannot delete a rejected pusher");
                        }
                        return;
                    }
                    Ok(Sent::Refused(why)) => {
                        tracing::warn!(user, app_id, position = push.position, reason = %why,
                            "the push gateway refused a push; dropping it");
                    }
                    Err(e) => {
                        let attempts =
                            self.store.record_push_failure(user, app_id, pushkey, push.position).await.unwrap_or(0);
                        if attempts >= config.max_attempts as i32 {
                            tracing::warn!(user, app_id, position = push.position, attempts, error = %e,
                                "a push failed too often; dropping it");
                        } else {
                            tracing::info!(user, app_id, position = push.position, attempts, error = %e,
                                retry_in_ms = retry.as_millis() as u64, "a push failed; will retry");
                            tokio::time::sleep(retry).await;
                            retry = (retry * 2).min(max_retry);
                            break;
                        }
                    }
                }
                if let Err(e) = self.store.delete_queued_push(user, app_id, pushkey, push.position).await {
                    tracing::warn!(user, app_id, error = %e, "cannot dequeue a push");
                    break;
                }
            }
        }
    }

    /// Builds and sends one push. `Err` is a failure that may pass (unreachable,
    /// timeout, `5xx`, `408`, `429`).
    async fn send_push(&self, pusher: &PusherRow, push: &QueuedPush) -> Result<Sent> {
        let mut data: serde_json::Map<String, JsonValue> =
            serde_json::from_str(&pusher.data).map_err(Error::internal)?;
        let Some(url) = data.remove("url").and_then(|u| u.as_str().map(str::to_owned)) else {
            return Ok(Sent::Refused("the pusher has no url".to_owned()));
        };
        let device_data: PusherData = serde_json::from_value(JsonValue::Object(data)).map_err(Error::internal)?;
        let event_id_only = device_data.format == Some(PushFormat::EventIdOnly);
        let mut device = Device::new(pusher.app_id.clone(), pusher.pushkey.clone());
        device.pushkey_ts = UInt::new((pusher.pushkey_ts / 1000).max(0) as u64).map(SecondsSinceUnixEpoch);
        device.data = device_data;
        let (unread, calls) = self.store.count_unread_for_push(&pusher.user_id).await?;
        let counts = NotificationCounts::new(
            UInt::new(unread.max(0) as u64).unwrap_or_default(),
            UInt::new(calls.max(0) as u64).unwrap_or_default(),
        );
        let notification = match (push.kind.as_str(), &push.room_id, &push.event_id) {
            ("event", Some(room_id), Some(event_id)) => {
                let Some(n) =
                    self.event_notification(pusher, push, room_id, event_id, event_id_only, &mut device).await?
                else {
                    // The event or its notification is gone (the room was purged): nothing to say.
                    return Ok(Sent::Delivered);
                };
                n
            }
            _ => Notification::new(Vec::new()),
        };
        let mut notification = notification;
        notification.counts = counts;
        notification.devices = vec![device];
        self.post_notification(&url, &pusher.pushkey, &notification).await
    }

    /// The event part of a push: ids, and unless `event_id_only` the event's type,
    /// sender, content and the room's name; the device's tweaks from the actions.
    /// `None` when the event is no longer stored.
    async fn event_notification(
        &self,
        pusher: &PusherRow,
        push: &QueuedPush,
        room_id: &str,
        event_id: &str,
        event_id_only: bool,
        device: &mut Device,
    ) -> Result<Option<Notification>> {
        let Some(event) = self.store.get_event(event_id).await? else { return Ok(None) };
        let actions = match self.store.get_push_action(&pusher.user_id, room_id, push.position).await? {
            Some((actions, highlight)) => actions_or_default(actions.as_deref(), highlight != 0),
            None => actions_or_default(None, false),
        };
        device.tweaks = actions
            .iter()
            .filter_map(|a| match a {
                Action::SetTweak(tweak) => Some(tweak.clone()),
                _ => None,
            })
            .collect();
        let mut n = Notification::new(Vec::new());
        n.event_id = OwnedEventId::try_from(event_id).ok();
        n.room_id = OwnedRoomId::try_from(room_id).ok();
        // High when the user is to hear it (a sound or a highlight), or when the server
        // cannot tell (encrypted); low otherwise.
        let loud = device.tweaks.iter().any(|t| match t {
            Tweak::Sound(_) => true,
            Tweak::Highlight(value) => *value == ruma::push::HighlightTweakValue::Yes,
            _ => false,
        });
        n.prio = if loud || event.event_type == "m.room.encrypted" {
            NotificationPriority::High
        } else {
            NotificationPriority::Low
        };
        if event_id_only {
            return Ok(Some(n));
        }
        let pdu: JsonValue = serde_json::from_str(&event.json).map_err(Error::internal)?;
        n.event_type = Some(TimelineEventType::from(event.event_type.as_str()));
        n.sender = OwnedUserId::try_from(event.sender.as_str()).ok();
        n.user_is_target = event.event_type == "m.room.member" && event.state_key.as_deref() == Some(&pusher.user_id);
        if let Some(content) = pdu.get("content") {
            n.content = RawValue::from_string(content.to_string()).ok();
        }
        let keys = [
            ("m.room.member".to_owned(), event.sender.clone()),
            ("m.room.name".to_owned(), String::new()),
            ("m.room.canonical_alias".to_owned(), String::new()),
        ];
        for state in self.store.get_current_state_entries(room_id, &keys).await? {
            let json: JsonValue = serde_json::from_str(&state.json).map_err(Error::internal)?;
            let content = &json["content"];
            match state.event_type.as_str() {
                "m.room.member" => n.sender_display_name = content["displayname"].as_str().map(str::to_owned),
                "m.room.name" => n.room_name = content["name"].as_str().filter(|s| !s.is_empty()).map(str::to_owned),
                _ => n.room_alias = content["alias"].as_str().and_then(|a| OwnedRoomAliasId::try_from(a).ok()),
            }
        }
        Ok(Some(n))
    }

    /// `POST {url}` with `{"notification": ...}`, and reads the gateway's answer.
    async fn post_notification(&self, url: &str, pushkey: &str, notification: &Notification) -> Result<Sent> {
        let parsed = reqwest::Url::parse(url).map_err(|e| Error::internal(format!("pusher url: {e}")))?;
        if !self.push_sender.allow_private && !super::pushers::is_public_host(parsed.host_str().unwrap_or_default()) {
            return Ok(Sent::Refused(format!(
                "{url} names a private address (push.allow_private_destinations is off)"
            )));
        }
        let body = json!({ "notification": notification });
        let mut response = self
            .push_sender
            .http
            .post(parsed)
            .json(&body)
            .send()
            .await
            .map_err(|e| Error::internal(format!("push gateway {url}: {}", describe(&e))))?;
        let status = response.status();
        let mut answer = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|e| Error::internal(format!("push gateway {url}: {}", describe(&e))))?
        {
            if answer.len() + chunk.len() > MAX_RESPONSE_BYTES {
                break;
            }
            answer.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
            if status.is_client_error()
                && status != http::StatusCode::REQUEST_TIMEOUT
                && status != http::StatusCode::TOO_MANY_REQUESTS
            {
                return Ok(Sent::Refused(format!("{url} answered {status}: {text}")));
            }
            return Err(Error::internal(format!("push gateway {url} answered {status}: {text}")));
        }
        // An answer that is not the spec's rejects nothing.
        let answer = http::Response::builder().status(status).body(answer.as_slice());
        let rejected = answer
            .ok()
            .and_then(|a| NotifyResponse::try_from_http_response(a).ok())
            .map(|r| r.rejected)
            .unwrap_or_default();
        if rejected.iter().any(|k| k == pushkey) {
            return Ok(Sent::Rejected);
        }
        Ok(Sent::Delivered)
    }
}

/// A reqwest error with its causes.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
