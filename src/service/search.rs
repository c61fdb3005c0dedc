//! `POST /search` (room events): the words of a search term, the rooms and stretches of
//! history the user may see (the rooms they have been joined to, each read through
//! `rooms/visibility.rs`), one indexed query for a page of matches and its count
//! (`storage/search.rs`), then what the request asks around them: context, profiles,
//! room state, groups and highlights. Pagination tokens: `r{offset}` in rank order,
//! `b{stream position}` (results before it) in recent order.

use std::collections::{BTreeMap, HashMap, HashSet};

use ruma::{
    DeviceId, OwnedMxcUri, OwnedRoomId, OwnedUserId, UInt, UserId,
    api::client::search::search_events::v3::{
        Criteria, EventContextResult, GroupingKey, OrderBy, ResultGroup, ResultGroupMap, ResultRoomEvents, SearchKeys,
        SearchResult, UserProfile,
    },
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{format::Viewer, messages::EventFilter, visibility::Visibility},
    },
    storage::{MAX_SEARCH_RANGES, SEARCH_KEYS, SearchHit, SearchOrder, SearchQuery, StoredEvent},
};

/// Results per page when the filter names no limit, and the most a filter may ask.
const DEFAULT_LIMIT: u64 = 10;
const MAX_LIMIT: u64 = 50;
/// Most context events on either side of a result.
const MAX_CONTEXT: u64 = 20;
/// Words of a search term that count, and characters of a word.
const MAX_WORDS: usize = 16;
const MAX_WORD_CHARS: usize = 100;
/// Most highlights returned.
const MAX_HIGHLIGHTS: usize = 50;

/// The words of a search term: runs of letters and digits (what both full-text
/// indexes see as words), in order, without repeats; everything else separates them.
pub fn search_words(term: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for word in term.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let word: String = word.chars().take(MAX_WORD_CHARS).collect();
        if !words.iter().any(|w| w.to_lowercase() == word.to_lowercase()) {
            words.push(word);
        }
        if words.len() == MAX_WORDS {
            break;
        }
    }
    words
}

/// Where a page starts.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    /// Rank order: matches skipped.
    Offset(i64),
    /// Recent order: matches before this stream position.
    Before(i64),
}

fn parse_batch(token: &str, order: SearchOrder) -> Result<Batch> {
    let invalid = || Error::invalid_param("Invalid next_batch: pass the next_batch of the same search");
    let number = |rest: &str| rest.parse::<i64>().map_err(|_| invalid());
    match (order, token.split_at_checked(1)) {
        (SearchOrder::Rank, Some(("r", rest))) => Ok(Batch::Offset(number(rest)?.max(0))),
        (SearchOrder::Recent, Some(("b", rest))) => Ok(Batch::Before(number(rest)?)),
        _ => Err(invalid()),
    }
}

/// The keys a search looks in: those asked for (all by default) whose event type
/// passes the filter.
fn search_keys(asked: Option<&[SearchKeys]>, filter: &EventFilter) -> Result<Vec<&'static str>> {
    let asked: Vec<&str> = match asked {
        None => SEARCH_KEYS.iter().map(|(_, key, _)| *key).collect(),
        Some(keys) => keys.iter().map(SearchKeys::as_str).collect(),
    };
    let mut keys = Vec::new();
    for key in asked {
        let Some((event_type, key, _)) = SEARCH_KEYS.iter().find(|(_, k, _)| *k == key) else {
            return Err(Error::bad_json(format!(
                "Unknown search key {key}: content.body, content.name or content.topic"
            )));
        };
        if filter.matches_type(event_type) && !keys.contains(key) {
            keys.push(*key);
        }
    }
    Ok(keys)
}

/// The highlights: the words searched for, and the words of the results they are a
/// prefix of (both indexes match words by prefix, ignoring case).
fn highlights(words: &[String], hits: &[&SearchHit]) -> Vec<String> {
    let prefixes: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let mut found: Vec<String> = words.to_vec();
    for hit in hits {
        for word in hit.value.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            let lower = word.to_lowercase();
            if prefixes.iter().any(|p| lower.starts_with(p.as_str())) && !found.iter().any(|f| f == word) {
                found.push(word.to_owned());
            }
        }
    }
    found.truncate(MAX_HIGHLIGHTS);
    found
}

fn uint(n: usize) -> UInt {
    UInt::try_from(n as u64).unwrap_or(UInt::MAX)
}

impl Services {
    /// `POST /search`, category `room_events`, as `user` (on `device`) may see it.
    pub async fn search_room_events(
        &self,
        user: &UserId,
        device: &DeviceId,
        criteria: &Criteria,
        next_batch: Option<&str>,
    ) -> Result<ResultRoomEvents> {
        let order = match &criteria.order_by {
            None | Some(OrderBy::Rank) => SearchOrder::Rank,
            Some(OrderBy::Recent) => SearchOrder::Recent,
            Some(other) => return Err(Error::bad_json(format!("Unknown order_by {}: rank or recent", other.as_str()))),
        };
        let mut group_by = Vec::new();
        for grouping in &criteria.groupings.group_by {
            match &grouping.key {
                Some(GroupingKey::RoomId) | Some(GroupingKey::Sender) => group_by.extend(grouping.key.clone()),
                Some(other) => {
                    return Err(Error::bad_json(format!("Unknown grouping key {}: room_id or sender", other.as_str())));
                }
                None => {}
            }
        }
        let batch = next_batch.map(|token| parse_batch(token, order)).transpose()?;
        let f = &criteria.filter;
        let filter = EventFilter {
            types: f.types.clone(),
            not_types: f.not_types.clone(),
            senders: f.senders.as_ref().map(|s| s.iter().map(ToString::to_string).collect()),
            not_senders: f.not_senders.iter().map(ToString::to_string).collect(),
            lazy_load_members: false,
        };
        let keys = search_keys(criteria.keys.as_deref(), &filter)?;
        let limit = f.limit.map_or(DEFAULT_LIMIT, u64::from).clamp(1, MAX_LIMIT) as usize;
        let words = search_words(&criteria.search_term);

        // The rooms the user has been joined to, and the stretches of each they may see.
        let mut visibilities = HashMap::new();
        let mut ranges = Vec::new();
        for row in self.store.get_user_memberships(user.as_str()).await? {
            if !matches!(row.membership.as_str(), "join" | "leave" | "ban") {
                continue;
            }
            let Ok(room_id) = OwnedRoomId::try_from(row.room_id) else { continue };
            if f.rooms.as_ref().is_some_and(|rooms| !rooms.contains(&room_id)) || f.not_rooms.contains(&room_id) {
                continue;
            }
            let vis = self.visibility_for(&room_id, user).await?;
            if vis.memberships.is_empty() {
                continue;
            }
            ranges.extend(vis.visible_ranges().into_iter().map(|(lo, hi)| (room_id.as_str().to_owned(), lo, hi)));
            visibilities.insert(room_id, vis);
        }
        if ranges.len() > MAX_SEARCH_RANGES {
            return Err(Error::invalid_param("Too many rooms to search at once: name some in filter.rooms"));
        }

        let query = SearchQuery {
            words: &words,
            ranges: &ranges,
            keys: &keys,
            senders: filter.senders.as_deref(),
            not_senders: &filter.not_senders,
            order,
            before: match batch {
                Some(Batch::Before(pos)) => Some(pos),
                _ => None,
            },
            offset: match batch {
                Some(Batch::Offset(n)) => n,
                _ => 0,
            },
            // One more than a page: whether there is a next one.
            limit: limit as i64 + 1,
        };
        let (mut hits, count) = self.store.search_events(&query).await?;
        let more = hits.len() > limit;
        hits.truncate(limit);
        let next_batch = match (more, order, hits.last()) {
            (true, SearchOrder::Rank, _) => Some(format!("r{}", query.offset + limit as i64)),
            (true, SearchOrder::Recent, Some(last)) => Some(format!("b{}", last.stream_ordering)),
            _ => None,
        };

        // The events, each checked against the state at it (backfilled history).
        let ids: Vec<String> = hits.iter().map(|h| h.event_id.clone()).collect();
        let mut events: HashMap<String, StoredEvent> =
            self.store.get_events_by_ids(&ids).await?.into_iter().map(|e| (e.event_id.clone(), e)).collect();
        events.retain(|_, e| e.position.is_some() && e.redacted_by.is_none() && e.rejected_reason.is_none());
        let mut visible = HashSet::new();
        for (room_id, vis) in &visibilities {
            let of_room: Vec<&StoredEvent> = events.values().filter(|e| e.room_id == room_id.as_str()).collect();
            if !of_room.is_empty() {
                visible.extend(self.visible_by_state(user, vis, &of_room).await?);
            }
        }
        let hits: Vec<&SearchHit> = hits.iter().filter(|h| visible.contains(&h.event_id)).collect();
        let found: Vec<StoredEvent> = hits.iter().filter_map(|h| events.remove(&h.event_id)).collect();

        let viewer = Some(Viewer { user_id: user, device_id: Some(device) });
        let formatted = self.client_events(&found, viewer, true).await?;
        let context = &criteria.event_context;
        let (before, after) =
            (u64::from(context.before_limit).min(MAX_CONTEXT), u64::from(context.after_limit).min(MAX_CONTEXT));
        let contexts = self
            .search_contexts(
                user,
                viewer,
                &found,
                &visibilities,
                before as usize,
                after as usize,
                context.include_profile,
            )
            .await?;
        let mut results = Vec::with_capacity(found.len());
        for ((json, hit), context) in formatted.into_iter().zip(&hits).zip(contexts) {
            let mut result = SearchResult::new();
            result.rank = Some(hit.rank);
            result.result = Some(json);
            result.context = context;
            results.push(result);
        }

        let mut response = ResultRoomEvents::new();
        response.count = Some(UInt::try_from(count.max(0) as u64).unwrap_or(UInt::MAX));
        response.highlights = highlights(&words, &hits);
        response.next_batch = next_batch;
        response.results = results;
        if criteria.include_state == Some(true) {
            let mut rooms: Vec<&str> = found.iter().map(|e| e.room_id.as_str()).collect();
            rooms.sort_unstable();
            rooms.dedup();
            for room in rooms {
                let room_id = OwnedRoomId::try_from(room).map_err(Error::internal)?;
                let state = self.room_state_for(&room_id, user).await?;
                let state = self.client_events(&state, viewer, true).await?;
                response.state.insert(room_id, state);
            }
        }
        for key in group_by {
            let group_of = |e: &StoredEvent| match key {
                GroupingKey::RoomId => e.room_id.clone(),
                _ => e.sender.clone(),
            };
            let mut groups: BTreeMap<String, ResultGroup> = BTreeMap::new();
            let mut order = 0;
            for event in &found {
                let group = groups.entry(group_of(event)).or_insert_with(|| {
                    order += 1;
                    let mut group = ResultGroup::new();
                    group.order = Some(uint(order));
                    group
                });
                group.results.push(event.event_id.as_str().try_into().map_err(Error::internal)?);
            }
            let map = match key {
                GroupingKey::RoomId => ResultGroupMap::RoomId(
                    groups.into_iter().filter_map(|(k, v)| OwnedRoomId::try_from(k).ok().map(|k| (k, v))).collect(),
                ),
                _ => ResultGroupMap::Sender(
                    groups.into_iter().filter_map(|(k, v)| OwnedUserId::try_from(k).ok().map(|k| (k, v))).collect(),
                ),
            };
            response.groups.insert(map);
        }
        Ok(response)
    }

    /// The events around each result that the user may see, with pagination tokens
    /// (topological, as `/messages` takes them), and the senders' profiles as of each
    /// result (from the member events in the state at it) when asked. Two indexed reads
    /// per result; visibility, formatting and profiles once for all of them.
    #[allow(clippy::too_many_arguments)]
    async fn search_contexts(
        &self,
        user: &UserId,
        viewer: Option<Viewer<'_>>,
        found: &[StoredEvent],
        visibilities: &HashMap<OwnedRoomId, Visibility>,
        before: usize,
        after: usize,
        include_profile: bool,
    ) -> Result<Vec<EventContextResult>> {
        let mut contexts: Vec<EventContextResult> = found.iter().map(|_| EventContextResult::new()).collect();
        if found.is_empty() {
            return Ok(contexts);
        }
        // The candidates on either side of each result: a few more than asked, as some
        // may be hidden from the user.
        let ranges: HashMap<&str, Vec<(i64, i64)>> = visibilities
            .iter()
            .map(|(room, vis)| {
                let ranges = vis.visible_ranges();
                (room.as_str(), if ranges.len() <= 50 { ranges } else { Vec::new() })
            })
            .collect();
        let mut sides: Vec<Vec<StoredEvent>> = Vec::with_capacity(found.len() * 2);
        for event in found {
            let ranges = ranges.get(event.room_id.as_str()).map_or(&[][..], Vec::as_slice);
            for (backwards, wanted) in [(true, before), (false, after)] {
                if wanted == 0 {
                    sides.push(Vec::new());
                    continue;
                }
                let from = if backwards {
                    (event.depth, event.stream_ordering - 1)
                } else {
                    (event.depth, event.stream_ordering)
                };
                let read = (wanted * 2 + 2) as i64;
                sides.push(
                    self.store.get_room_events_topological(&event.room_id, from, None, ranges, read, backwards).await?,
                );
            }
        }

        // Which candidates the user may see: by the visibility changes, then by the
        // state at each (one pass per room).
        let mut visible = HashSet::new();
        for (room_id, vis) in visibilities {
            let candidates: Vec<&StoredEvent> =
                sides.iter().flatten().filter(|e| e.room_id == room_id.as_str() && vis.may_see(user, e)).collect();
            if !candidates.is_empty() {
                visible.extend(self.visible_by_state(user, vis, &candidates).await?);
            }
        }

        // Each side keeps its first visible events; its token continues after the last
        // event looked at.
        let mut shown: Vec<StoredEvent> = Vec::new();
        let mut spans = Vec::with_capacity(found.len());
        for (i, event) in found.iter().enumerate() {
            let mut span = [(0, 0), (0, 0)];
            for (side, (backwards, wanted)) in [(true, before), (false, after)].into_iter().enumerate() {
                if wanted == 0 {
                    continue;
                }
                let mut cursor = if backwards {
                    (event.depth, event.stream_ordering - 1)
                } else {
                    (event.depth, event.stream_ordering)
                };
                let first = shown.len();
                for candidate in &sides[i * 2 + side] {
                    if shown.len() - first == wanted {
                        break;
                    }
                    cursor = if backwards {
                        (candidate.depth, candidate.stream_ordering - 1)
                    } else {
                        (candidate.depth, candidate.stream_ordering)
                    };
                    if visible.contains(&candidate.event_id) {
                        shown.push(candidate.clone());
                    }
                }
                span[side] = (first, shown.len());
                let token = Some(format!("t{}-{}", cursor.0, cursor.1));
                if backwards {
                    contexts[i].start = token;
                } else {
                    contexts[i].end = token;
                }
            }
            spans.push(span);
        }
        let formatted = self.client_events(&shown, viewer, true).await?;
        let mut formatted: Vec<Option<ruma::serde::Raw<_>>> = formatted.into_iter().map(Some).collect();
        for (context, [(b0, b1), (a0, a1)]) in contexts.iter_mut().zip(&spans) {
            context.events_before.extend(formatted[*b0..*b1].iter_mut().filter_map(Option::take));
            context.events_after.extend(formatted[*a0..*a1].iter_mut().filter_map(Option::take));
        }

        if include_profile {
            // The senders of each result and its context, read once per state group.
            let mut senders_by_group: BTreeMap<(i64, &str), Vec<String>> = BTreeMap::new();
            for (event, [(b0, b1), (a0, a1)]) in found.iter().zip(&spans) {
                let senders = senders_by_group.entry((event.state_group, event.room_id.as_str())).or_default();
                senders.push(event.sender.clone());
                senders.extend(shown[*b0..*b1].iter().chain(&shown[*a0..*a1]).map(|e| e.sender.clone()));
            }
            let mut profiles: HashMap<(i64, &str), BTreeMap<OwnedUserId, UserProfile>> = HashMap::new();
            for ((group, room), mut senders) in senders_by_group {
                senders.sort_unstable();
                senders.dedup();
                let keys: Vec<(String, String)> =
                    senders.iter().map(|s| ("m.room.member".to_owned(), s.clone())).collect();
                let members = if group != 0 {
                    let ids: Vec<String> =
                        self.store.get_state_group_entries(group, &keys).await?.into_iter().map(|e| e.2).collect();
                    self.store.get_events_by_ids(&ids).await?
                } else {
                    self.store.get_current_state_entries(room, &keys).await?
                };
                profiles.insert((group, room), members.iter().filter_map(member_profile).collect());
            }
            for ((context, event), [(b0, b1), (a0, a1)]) in contexts.iter_mut().zip(found).zip(&spans) {
                let Some(known) = profiles.get(&(event.state_group, event.room_id.as_str())) else { continue };
                let senders = std::iter::once(event).chain(&shown[*b0..*b1]).chain(&shown[*a0..*a1]);
                for sender in senders.map(|e| e.sender.as_str()) {
                    if let Some((user_id, profile)) = known.iter().find(|(u, _)| u.as_str() == sender) {
                        context.profile_info.insert(user_id.clone(), profile.clone());
                    }
                }
            }
        }
        Ok(contexts)
    }
}

/// The profile a member event gives its user.
fn member_profile(member: &StoredEvent) -> Option<(OwnedUserId, UserProfile)> {
    let json = serde_json::from_str::<JsonValue>(&member.json).ok()?;
    let user_id = OwnedUserId::try_from(member.state_key.as_deref()?).ok()?;
    let content = &json["content"];
    let mut profile = UserProfile::new();
    profile.displayname = content["displayname"].as_str().map(str::to_owned);
    profile.avatar_url = content["avatar_url"].as_str().map(OwnedMxcUri::from);
    Some((user_id, profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_runs_of_letters_and_digits() {
        assert_eq!(search_words("hello, World"), vec!["hello", "World"]);
        assert_eq!(
            search_words("\"unbalanced * NEAR(a b) col:x OR -y"),
            vec!["unbalanced", "NEAR", "a", "b", "col", "x", "OR", "y"]
        );
        assert_eq!(search_words("Grüße 東京 hello HELLO"), vec!["Grüße", "東京", "hello"]);
        assert!(search_words("\"*:^()'").is_empty());
        assert_eq!(search_words(&"w ".repeat(100)).len(), 1);
        assert_eq!(search_words(&(0..100).map(|i| format!("w{i} ")).collect::<String>()).len(), MAX_WORDS);
    }

    #[test]
    fn batches_belong_to_their_order() {
        assert_eq!(parse_batch("r20", SearchOrder::Rank).unwrap(), Batch::Offset(20));
        assert_eq!(parse_batch("b-5", SearchOrder::Recent).unwrap(), Batch::Before(-5));
        for (token, order) in [
            ("b20", SearchOrder::Rank),
            ("r20", SearchOrder::Recent),
            ("", SearchOrder::Rank),
            ("rx", SearchOrder::Rank),
            ("é", SearchOrder::Recent),
            ("b99999999999999999999", SearchOrder::Recent),
        ] {
            assert!(parse_batch(token, order).is_err(), "{token}");
        }
    }
}
