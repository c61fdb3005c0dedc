//! Notifications: each new room event is run through the push rules of the room's
//! local members (other than its sender); who it notifies, and for whom it highlights,
//! is recorded with the event (with the actions of the rule that matched), and `/sync`
//! counts those records after the user's read receipt (`storage/push.rs`).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    events::StateEventType,
    power_levels::NotificationPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::{RoomPowerLevelsRules, RoomVersionRules},
    serde::Raw,
};
use serde_json::{Value as JsonValue, value::RawValue};

use super::{
    Services,
    cache::{ByteCache, ENTRY_OVERHEAD, heap_str},
    rooms::pdu::Pdu,
};
use crate::{
    error::{Error, Result},
    storage::{PushActionRow, PushGroupRow, PushOutcome, SpanChange},
};

/// Rulesets of users who recently received events, so that every event does not
/// read each recipient's `m.push_rules` again. Dropped for a user whose rules change.
/// Both maps are bounded in estimated bytes (`cache::shares`). A user's entry is small
/// (an id and a shared template): the parsed rules are kept once per template, so that
/// a room of tens of thousands of members stays cached.
pub struct RulesetCache {
    users: ByteCache<OwnedUserId, Arc<UserRules>>,
    /// Moves whenever a user's rules change (`forget`): the rules kept with each room's
    /// members (`RoomPushMember::rules`) are looked up again.
    generation: std::sync::atomic::AtomicU64,
    /// Templates (a ruleset as JSON with its user's id taken out) by their JSON: users
    /// whose templates are equal have the same rules but for their own id.
    templates: ByteCache<Arc<str>, Arc<Template>>,
}

/// Rules shared by users whose rulesets are equal but for their own ids.
pub struct Template {
    /// A hash of `json` (its first eight bytes of SHA-256): the same across restarts,
    /// it names the template in the database (`push_groups`, `push_spans`).
    key: i64,
    /// The ruleset as JSON, the user's id replaced by a NUL.
    json: Arc<str>,
    /// The ruleset of the user it was made from (`user`): a member's own ruleset
    /// answers as this one for events that hold neither id (see `evaluate_grouped`).
    rules: Ruleset,
    user: OwnedUserId,
    folded_id: String,
}

fn weigh_rules(user: &OwnedUserId, rules: &Arc<UserRules>) -> usize {
    heap_str(user.as_str()) + rules.bytes + ENTRY_OVERHEAD
}

fn weigh_template(key: &Arc<str>, template: &Arc<Template>) -> usize {
    // The text in its `Arc` (two counters, shared by the key and `json`), the parsed
    // rules (see `ruleset_bytes`), the maker's id.
    heap_str(key)
        + 16
        + 2 * key.len()
        + heap_str(template.user.as_str())
        + heap_str(&template.folded_id)
        + std::mem::size_of::<Template>()
        + 16
        + ENTRY_OVERHEAD
}

impl RulesetCache {
    pub fn new(rules_bytes: usize, template_bytes: usize) -> Self {
        RulesetCache {
            users: ByteCache::new(rules_bytes, weigh_rules),
            generation: std::sync::atomic::AtomicU64::new(0),
            templates: ByteCache::new(template_bytes, weigh_template),
        }
    }

    /// Estimated bytes held by the rulesets and the templates, with their bounds (tests).
    pub fn bytes(&self) -> [(usize, usize); 2] {
        [(self.users.bytes(), self.users.max_bytes()), (self.templates.bytes(), self.templates.max_bytes())]
    }
}

/// A user's ruleset, with what grouping users by their rules needs to know of it.
pub struct UserRules {
    rules: Rules,
    /// Whether a rule has a `contains_display_name` condition (then the display name
    /// matters too).
    uses_display_name: bool,
    /// The user id, lower-cased as push rule matching compares (see `fold`).
    folded_id: String,
    /// Bytes held, estimated (see `ruleset_bytes`).
    bytes: usize,
}

/// What a `Ruleset` holds in memory, estimated from its JSON: its strings (rule ids,
/// patterns, condition keys) and, for each rule, the vectors of conditions and actions
/// and the index set's slot. Measured with a counting allocator (`estimates_are_not_
/// below_the_heap_taken`): the server's default ruleset takes about 1.4 times its
/// JSON's length; counted as twice, plus the fixed part.
fn ruleset_bytes(json_len: usize, folded_id: &str) -> usize {
    2 * json_len + heap_str(folded_id) + std::mem::size_of::<UserRules>() + 16
}

enum Rules {
    /// The user's rules are their template's with their own id.
    Shared(Arc<Template>),
    /// Rules always evaluated on their own (an id with glob or JSON-escaped characters).
    Own(Box<Ruleset>),
}

impl UserRules {
    /// The key of the ruleset's template, or `None` when this user's rules are always
    /// evaluated on their own.
    fn template(&self) -> Option<i64> {
        match &self.rules {
            Rules::Shared(t) => Some(t.key),
            Rules::Own(_) => None,
        }
    }

    /// The user's own ruleset: their template's when they made it, else read from the
    /// template's JSON with their id put back (exactly their ruleset's JSON).
    fn own(&self, user: &UserId) -> Result<Cow<'_, Ruleset>> {
        match &self.rules {
            Rules::Own(rules) => Ok(Cow::Borrowed(rules)),
            Rules::Shared(t) if t.user == user => Ok(Cow::Borrowed(&t.rules)),
            Rules::Shared(t) => {
                Ok(Cow::Owned(serde_json::from_str(&t.json.replace('\0', user.as_str())).map_err(Error::internal)?))
            }
        }
    }
}

/// Per room: the joined count, and each local member's display name in the room, the
/// template their counts follow there (their open span, `push_spans`) and their rules.
#[derive(Clone)]
pub struct RoomPushMembers {
    /// `None` when a remote user's membership changed since it was counted.
    joined_count: Option<UInt>,
    members: HashMap<OwnedUserId, RoomPushMember>,
    /// The ruleset cache's generation (`RulesetCache::generation`) the members' rules
    /// are of: when it moved, every member's rules are looked up again.
    rules_generation: u64,
    /// The members' heap bytes (`RoomPushMember::heap`), kept as they change: weighing
    /// the entry after each change in place does not walk a large room's members.
    heap: usize,
}

/// A local member, as `RoomPushMembers` keeps them.
#[derive(Clone)]
struct RoomPushMember {
    name: String,
    name_key: Option<u16>,
    span: Option<i64>,
    /// Kept here so that a send in a large room walks one map instead of looking each
    /// member up in the ruleset cache; `None` until the next event looks them up.
    rules: Option<(Arc<UserRules>, RulesHints)>,
}

impl RoomPushMember {
    fn new(name: String, span: Option<i64>, rules: Option<Arc<UserRules>>) -> Self {
        let rules = rules.map(|r| {
            let hints = RulesHints::of(&r);
            (r, hints)
        });
        RoomPushMember { name_key: name_key(&name), name, span, rules }
    }

    /// The heap bytes of a member's entry: their boxed id, their name, and the entry of
    /// the rules it keeps alive (a shared ruleset's is small: the template is counted by
    /// its own cache).
    fn heap(user: &UserId, member: &RoomPushMember) -> usize {
        heap_str(user.as_str()) + heap_str(&member.name) + member.rules.as_ref().map_or(0, |r| r.0.bytes)
    }
}

impl RoomPushMembers {
    fn new(joined_count: Option<UInt>, members: HashMap<OwnedUserId, RoomPushMember>, rules_generation: u64) -> Self {
        let mut members = RoomPushMembers { joined_count, members, rules_generation, heap: 0 };
        members.heap = members.count_heap();
        members
    }

    fn count_heap(&self) -> usize {
        self.members.iter().map(|(user, m)| RoomPushMember::heap(user, m)).sum()
    }

    fn remove_member(&mut self, user: &UserId) -> Option<RoomPushMember> {
        let was = self.members.remove(user)?;
        self.heap -= RoomPushMember::heap(user, &was);
        Some(was)
    }

    fn insert_member(&mut self, user: OwnedUserId, member: RoomPushMember) {
        self.remove_member(&user);
        self.heap += RoomPushMember::heap(&user, &member);
        self.members.insert(user, member);
    }

    /// Whether `user` is a joined local member.
    pub(crate) fn has(&self, user: &str) -> bool {
        <&UserId>::try_from(user).is_ok_and(|u| self.members.contains_key(u))
    }
}

/// `RoomPushMembers` by room, bounded in estimated bytes (`cache::shares::PUSH_MEMBERS`);
/// changed in place or dropped, like the member cache, on membership changes.
pub struct PushMembersCache {
    rooms: ByteCache<OwnedRoomId, Arc<RoomPushMembers>>,
}

fn weigh_push_members(room_id: &OwnedRoomId, members: &Arc<RoomPushMembers>) -> usize {
    // Per member, what `RoomPushMember::heap` counts (kept as members change); per slot
    // of the map's capacity (which may have grown by changes in place), an entry with
    // the table's spare room and control byte; a table has 4 slots at least.
    let heap = members.heap;
    let slots = members.members.capacity().max(4) * (std::mem::size_of::<(OwnedUserId, RoomPushMember)>() + 1) * 8 / 7;
    heap_str(room_id.as_str()) + heap + slots + std::mem::size_of::<RoomPushMembers>() + 16 + ENTRY_OVERHEAD
}

impl PushMembersCache {
    pub fn new(max_bytes: usize) -> Self {
        PushMembersCache { rooms: ByteCache::new(max_bytes, weigh_push_members) }
    }

    /// Estimated bytes held, and the bound (tests).
    pub fn bytes(&self) -> (usize, usize) {
        (self.rooms.bytes(), self.rooms.max_bytes())
    }

    pub fn forget(&self, room_id: &RoomId) {
        self.rooms.remove(room_id);
    }

    /// One user's membership changed (see `Services::member_changed`): the entry of
    /// the room, when cached, is changed in place.
    pub fn member_changed(&self, room_id: &RoomId, user: &UserId, local: bool, joined: bool, name: Option<String>) {
        self.rooms.update(room_id, |members| {
            let members = Arc::make_mut(members);
            if local {
                let was = members.remove_member(user);
                let was_joined = was.is_some();
                if joined {
                    let name = name.unwrap_or_else(|| user.localpart().to_owned());
                    // A new join has no span yet; a join that stays one keeps it.
                    let (span, rules) = was.map_or((None, None), |m| (m.span, m.rules.map(|r| r.0)));
                    members.insert_member(user.to_owned(), RoomPushMember::new(name, span, rules));
                }
                members.joined_count = match (members.joined_count, was_joined, joined) {
                    (Some(n), false, true) => n.checked_add(UInt::from(1u32)),
                    (Some(n), true, false) => n.checked_sub(UInt::from(1u32)),
                    (count, _, _) => count,
                };
            } else {
                members.joined_count = None;
            }
        });
    }

    /// The room's local members, when cached.
    pub(crate) fn members_of(&self, room_id: &RoomId) -> Option<Arc<RoomPushMembers>> {
        self.rooms.get(room_id)
    }

    /// Members' spans changed with an event just stored (`PushOutcome::spans`), under
    /// the room's lock: the room's entry, when cached, follows.
    pub(crate) fn spans_moved(&self, room_id: &RoomId, changes: &[SpanChange]) {
        self.rooms.update(room_id, |members| {
            let members = Arc::make_mut(members);
            for change in changes {
                let Ok(user) = <&UserId>::try_from(change.user_id.as_str()) else { continue };
                if let Some(member) = members.members.get_mut(user) {
                    member.span = change.template;
                }
            }
        });
    }

    /// Records members' rules, looked up at `generation`, in the room's entry when it is
    /// still `members` (else a change came since; they are looked up again next time).
    /// The caller lets go of `members`, so that the entry is changed rather than copied.
    fn set_rules(
        &self,
        room_id: &RoomId,
        members: Arc<RoomPushMembers>,
        generation: u64,
        rules: &HashMap<OwnedUserId, Arc<UserRules>>,
    ) {
        let mut members = Some(members);
        self.rooms.update(room_id, |cached| {
            if members.as_ref().is_some_and(|m| Arc::ptr_eq(cached, m)) {
                members = None;
                let cached = Arc::make_mut(cached);
                if cached.rules_generation != generation {
                    cached.members.values_mut().for_each(|m| m.rules = None);
                    cached.rules_generation = generation;
                    cached.heap = cached.count_heap();
                }
                for (user, rules) in rules {
                    if let Some(member) = cached.members.get_mut(user) {
                        let was = member.rules.replace((rules.clone(), RulesHints::of(rules)));
                        cached.heap = cached.heap + rules.bytes - was.map_or(0, |r| r.0.bytes);
                    }
                }
            }
        });
    }

    /// Records the room's joined count, counted again after a remote membership change,
    /// in the room's entry if it is still `members` (else a change came since): the entry
    /// as it is now, or `members` when it is not cached.
    fn set_joined_count(&self, room_id: &RoomId, members: Arc<RoomPushMembers>, count: UInt) -> Arc<RoomPushMembers> {
        let mut members = Some(members);
        let mut updated = None;
        self.rooms.update(room_id, |cached| {
            if members.as_ref().is_some_and(|m| Arc::ptr_eq(cached, m)) {
                // Let go of it first, so that `make_mut` changes it rather than a copy.
                members = None;
                Arc::make_mut(cached).joined_count = Some(count);
                updated = Some(cached.clone());
            }
        });
        updated.or(members).expect("one of them is set")
    }
}

/// Member events looked up per query when collecting display names.
const MEMBER_CHUNK: usize = 200;

impl RulesetCache {
    pub fn forget(&self, user: &UserId) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.users.remove(user);
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A template's key: the first eight bytes of the SHA-256 of its JSON.
fn template_key(json: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(json.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

impl RulesetCache {
    /// Wraps a user's ruleset with its template (shared with the users whose rules are
    /// equal but for their ids).
    fn prepare(&self, user: &UserId, rules: Ruleset) -> Result<UserRules> {
        let json = serde_json::to_string(&rules).map_err(Error::internal)?;
        let uses_display_name = json.contains("\"contains_display_name\"");
        let id = user.as_str();
        let folded_id = fold(id);
        // The user id must appear in the JSON exactly as in the events' strings (no
        // escaped characters) and be matched literally (no glob characters); the
        // placeholder (a NUL) must not be in the JSON already.
        let plain = !id.contains(['*', '?', '"', '\\']) && !id.chars().any(char::is_control);
        let shared = plain && !json.contains('\0') && !json.contains("\\u0000");
        let rules = if shared {
            let key: Arc<str> = json.replace(id, "\0").into();
            let template = self.templates.get_or_insert_with(key.clone(), || {
                Arc::new(Template {
                    key: template_key(&key),
                    json: key,
                    rules,
                    user: user.to_owned(),
                    folded_id: folded_id.clone(),
                })
            });
            Rules::Shared(template)
        } else {
            Rules::Own(Box::new(rules))
        };
        // A shared entry holds its id and a pointer; the template holds the rules.
        let bytes = if shared {
            heap_str(&folded_id) + std::mem::size_of::<UserRules>() + 16
        } else {
            ruleset_bytes(json.len(), &folded_id)
        };
        Ok(UserRules { rules, uses_display_name, folded_id, bytes })
    }

    #[cfg(test)]
    fn get(&self, user: &UserId) -> Option<Arc<UserRules>> {
        self.users.get(user)
    }
}

/// Lower-cases as push rule matching does, with the final sigma (the one character
/// whose lower case depends on what follows it) made the ordinary one, so that a string
/// holds a folded part exactly when its folding holds it.
fn fold(s: &str) -> String {
    s.to_lowercase().replace('ς', "σ")
}

/// What of an event can make its push rules answer differently for two users with the
/// same template: the strings it holds (values and keys, folded, NUL-separated).
struct EventText {
    /// Each tail of the strings that starts at an `@` (up to the string's end), sorted:
    /// a user id is in the strings exactly when one of these starts with it.
    at_tails: Vec<String>,
    /// The hash (`id_hash`) of each start of each tail, up to the longest user id,
    /// sorted: a member's id is in the strings only if its hash is among these.
    tail_hashes: Vec<u64>,
    body: Option<String>,
    /// Which pairs of bytes follow each other in the body (a bit per pair).
    body_pairs: Option<Box<[u64; 1024]>>,
}

/// The longest user id, in bytes (the spec's bound): no tail longer than this starts
/// with a user id's bytes alone.
const MAX_USER_ID_BYTES: usize = 255;

/// A hash of a folded user id (64-bit FNV-1a, whose hash of each longer start of a
/// string follows from the shorter one's): an event none of whose `@` tails starts
/// with a string of this hash holds none of the ids of this hash, which is answered
/// without reading the ids. Ids alike in their first bytes (`@user1234:...`) do not
/// share it.
fn id_hash(folded_id: &str) -> u64 {
    prefix_hashes(folded_id.as_bytes()).last().unwrap_or(FNV_OFFSET)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The `id_hash` of each start of `bytes` (of one byte, two, ...), up to the longest
/// user id.
fn prefix_hashes(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.iter().take(MAX_USER_ID_BYTES).scan(FNV_OFFSET, |h, b| {
        *h = (*h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        Some(*h)
    })
}

/// The first two bytes of a folded ASCII display name (`None`: another name, checked in
/// full): a body without that pair of bytes does not hold the name.
fn name_key(display_name: &str) -> Option<u16> {
    let name = display_name.as_bytes();
    (display_name.is_ascii() && name.len() >= 2 && !display_name.contains(['*', '?']))
        .then(|| u16::from_le_bytes([name[0].to_ascii_lowercase(), name[1].to_ascii_lowercase()]))
}

impl EventText {
    fn of(event: &JsonValue) -> Self {
        fn walk(value: &JsonValue, out: &mut String) {
            match value {
                JsonValue::String(s) => {
                    out.push_str(&fold(s));
                    out.push('\0');
                }
                JsonValue::Array(items) => items.iter().for_each(|v| walk(v, out)),
                JsonValue::Object(map) => {
                    for (k, v) in map {
                        out.push_str(&fold(k));
                        out.push('\0');
                        walk(v, out);
                    }
                }
                _ => {}
            }
        }
        let mut strings = String::new();
        walk(event, &mut strings);
        let body = event["content"]["body"].as_str().map(fold);
        let mut at_tails: Vec<String> =
            strings.split('\0').flat_map(|s| s.match_indices('@').map(move |(i, _)| s[i..].to_owned())).collect();
        at_tails.sort_unstable();
        at_tails.dedup();
        let mut tail_hashes: Vec<u64> = at_tails.iter().flat_map(|t| prefix_hashes(t.as_bytes())).collect();
        tail_hashes.sort_unstable();
        tail_hashes.dedup();
        let body_pairs = body.as_ref().map(|body| {
            let mut pairs = Box::new([0u64; 1024]);
            for w in body.as_bytes().windows(2) {
                let pair = usize::from(u16::from_le_bytes([w[0], w[1]]));
                pairs[pair / 64] |= 1 << (pair % 64);
            }
            pairs
        });
        EventText { at_tails, tail_hashes, body, body_pairs }
    }

    /// Whether the event may concern this member in particular (their id is in one of
    /// its strings, or their display name in its body when their rules look at it, or
    /// their rules are their own): then their rules are evaluated for them alone. Their
    /// id or name is read only when the hash and name key kept with them do not already say no.
    fn singles_out(&self, member: &PushMember<'_>) -> bool {
        if member.hints.template.is_none() {
            return true;
        }
        let may_hold = self.tail_hashes.binary_search(&member.hints.id_hash).is_ok();
        if may_hold && self.holds(&member.rules.folded_id) {
            return true;
        }
        if !member.hints.uses_display_name {
            return false;
        }
        let name = member.display_name;
        match member.name_key {
            // A name with a key is neither empty nor a glob; the body holds it only if
            // it holds its first two bytes next to each other.
            Some(key) => {
                let key = usize::from(key);
                self.body_pairs.as_ref().is_some_and(|pairs| pairs[key / 64] & (1 << (key % 64)) != 0)
                    && self.body_holds_name(name)
            }
            None => name.is_empty() || name.contains(['*', '?']) || self.body_holds_name(name),
        }
    }

    /// Whether one of the event's strings holds this (folded) user id: a binary search
    /// rather than a scan of every string, as it is asked for each member of the room.
    /// (The first tail not below the id starts with it if any tail does: a tail that
    /// sorts after the id without starting with it sorts after all that do.)
    fn holds(&self, folded_id: &str) -> bool {
        let first = self.at_tails.partition_point(|t| t.as_str() < folded_id);
        self.at_tails.get(first).is_some_and(|t| t.starts_with(folded_id))
    }

    /// Whether the (folded) body holds this display name, folded: without folding a copy
    /// of the name when it is ASCII, as it is asked for each member of the room.
    fn body_holds_name(&self, display_name: &str) -> bool {
        let Some(body) = self.body.as_deref() else { return false };
        if display_name.is_empty() {
            return true;
        }
        if display_name.is_ascii() {
            let name = display_name.as_bytes();
            return body.len() >= name.len()
                && body.as_bytes().windows(name.len()).any(|w| w.eq_ignore_ascii_case(name));
        }
        body.contains(fold(display_name).as_str())
    }
}

/// A local member as push rule evaluation sees them: their rules, and the template
/// their counts follow in the room (their open span).
#[derive(Clone, Copy)]
pub(crate) struct PushMember<'a> {
    pub user: &'a UserId,
    pub display_name: &'a str,
    pub rules: &'a UserRules,
    pub span: Option<i64>,
    pub hints: RulesHints,
    pub name_key: Option<u16>,
}

/// What a send asks of each member's rules, kept next to them in the room's entry so
/// that a large room's members are walked without reading their rules.
#[derive(Clone, Copy)]
pub(crate) struct RulesHints {
    template: Option<i64>,
    uses_display_name: bool,
    id_hash: u64,
}

impl RulesHints {
    fn of(rules: &UserRules) -> Self {
        RulesHints {
            template: rules.template(),
            uses_display_name: rules.uses_display_name,
            id_hash: id_hash(&rules.folded_id),
        }
    }
}

/// Evaluates an event for members, and says how their answers are stored
/// (`PushOutcome`).
///
/// Members are evaluated once per template when the event does not single them out
/// (their answers are the same: the rules differ only by the user's own id, which the
/// event does not hold, and the display name, which its body does not hold or the rules
/// do not look at), and each on their own when it does. A template's shared ruleset is
/// its first user's: for a member the event does not single out, it answers as the
/// member's own when the event does not hold that first user's id either (a condition
/// that reads an id matches only an event that holds it); otherwise the member's own
/// ruleset is read back from the template.
///
/// The members grouped (`group_members`) are the room's local members but the sender,
/// whose span is `sender_span`.
/// The answer of a member the event does not single out, whose span in the room
/// (`PushMember::span`: the template their counts follow there) is their template, is
/// stored once for all of them: a row per template that notifies. Every other member
/// gets a row of their own where their answer differs from what their span's template
/// row (if written) says, and so does the sender, whom their own event never notifies.
/// Events in a thread write no template rows (a thread's counts are kept per member).
/// Members whose span is not their template change it with this event.
pub(crate) async fn evaluate_grouped(
    grouping: Grouping<'_>,
    sender: &UserId,
    sender_span: Option<i64>,
    event: &Raw<JsonValue>,
    base: &PushConditionRoomCtx,
) -> Result<PushOutcome> {
    type Answer = Option<(bool, Arc<str>)>;
    let Grouping { text, firsts, grouped, alone, moved } = grouping;
    let mut shared: HashMap<i64, Answer> = HashMap::with_capacity(firsts.len());
    for (key, member) in firsts {
        let answer = match &member.rules.rules {
            Rules::Shared(template) if !text.holds(&template.folded_id) => {
                evaluate_one(&member, &template.rules, event, base).await?
            }
            _ => evaluate_one(&member, &*member.rules.own(member.user)?, event, base).await?,
        };
        shared.insert(key, answer);
    }
    // What the template row of a member's span says for them: a row is written for a
    // template with members it answers for, when it notifies.
    let group_of = |span: Option<i64>| -> Option<&(bool, Arc<str>)> {
        let key = span.filter(|k| grouped.contains(k))?;
        shared.get(&key)?.as_ref()
    };
    let mut own = Vec::new();
    for (member, key) in &alone {
        let answer = match key {
            Some(key) => shared.get(key).cloned().flatten(),
            None => evaluate_one(member, &*member.rules.own(member.user)?, event, base).await?,
        };
        let group = group_of(member.span);
        if answer.as_ref() != group {
            own.push(own_row(member.user, answer.as_ref(), group));
        }
    }
    if let Some(group) = group_of(sender_span) {
        own.push(own_row(sender, None, Some(group)));
    }
    let mut grouped: Vec<i64> = grouped.into_iter().collect();
    grouped.sort_unstable();
    let groups = grouped
        .into_iter()
        .filter_map(|key| {
            let (highlight, actions) = shared.get(&key)?.as_ref()?;
            Some(PushGroupRow { template: key, highlight: *highlight, actions: actions.to_string() })
        })
        .collect();
    Ok(PushOutcome { own, groups, spans: moved })
}

/// A room's members sorted for `evaluate_grouped` (`group_members`), in one pass that
/// awaits nothing: the members' iterator is never held across an evaluation, and a
/// member the event does not single out costs a few comparisons of what is kept with
/// them (`RulesHints`), without reading their rules.
pub(crate) struct Grouping<'a> {
    text: EventText,
    /// A member per template whose answer is shared (the first met), whom the event
    /// does not single out.
    firsts: HashMap<i64, PushMember<'a>>,
    /// Templates with members their row answers for (members whose span is the
    /// template, in an event outside a thread).
    grouped: HashSet<i64>,
    /// Members with rows of their own: answered by their template (`Some`), or
    /// evaluated alone (`None`).
    alone: Vec<(PushMember<'a>, Option<i64>)>,
    moved: Vec<SpanChange>,
}

/// Sorts `members` (the room's local members but the sender) for `evaluate_grouped`.
pub(crate) fn group_members<'a>(
    members: impl IntoIterator<Item = PushMember<'a>>,
    event_json: &JsonValue,
) -> Grouping<'a> {
    let threaded = event_json["content"]["m.relates_to"]["rel_type"] == "m.thread";
    let mut g = Grouping {
        text: EventText::of(event_json),
        firsts: HashMap::new(),
        grouped: HashSet::new(),
        alone: Vec::new(),
        moved: Vec::new(),
    };
    // The template of the member before, already among `firsts` (and `grouped` when
    // that member was grouped): most members of a room share one template.
    let mut last: Option<(i64, bool)> = None;
    for member in members {
        let span = member.span;
        if member.hints.template != span {
            g.moved.push(SpanChange { user_id: member.user.to_string(), template: member.hints.template });
        }
        let Some(key) = member.hints.template.filter(|_| !g.text.singles_out(&member)) else {
            g.alone.push((member, None));
            continue;
        };
        let steady = !threaded && span == Some(key);
        if last != Some((key, true)) && (last != Some((key, false)) || steady) {
            g.firsts.entry(key).or_insert(member);
            if steady {
                g.grouped.insert(key);
            }
            last = Some((key, steady));
        }
        if !steady {
            g.alone.push((member, Some(key)));
        }
    }
    g
}

/// A member's own row: their answer (`None`: it does not notify them) and their
/// template row's.
fn own_row(user: &UserId, answer: Option<&(bool, Arc<str>)>, group: Option<&(bool, Arc<str>)>) -> PushActionRow {
    PushActionRow {
        user_id: user.to_string(),
        notifies: answer.is_some(),
        highlight: answer.is_some_and(|a| a.0),
        actions: answer.map_or_else(|| "[]".to_owned(), |a| a.1.to_string()),
        group_notifs: group.is_some(),
        group_highlight: group.is_some_and(|g| g.0),
    }
}

/// One member's evaluation with `rules`: `None` when the event does not notify them,
/// else whether it highlights and the actions (JSON).
async fn evaluate_one(
    member: &PushMember<'_>,
    rules: &Ruleset,
    event: &Raw<JsonValue>,
    base: &PushConditionRoomCtx,
) -> Result<Option<(bool, Arc<str>)>> {
    let mut ctx = base.clone();
    ctx.user_id = member.user.to_owned();
    ctx.user_display_name = member.display_name.to_owned();
    let actions = rules.get_actions(event, &ctx).await;
    if !actions.iter().any(Action::should_notify) {
        return Ok(None);
    }
    let json = serde_json::to_string(actions).map_err(Error::internal)?;
    Ok(Some((actions.iter().any(Action::is_highlight), json.into())))
}

impl Services {
    async fn cached_push_rules(&self, user: &UserId) -> Result<Arc<UserRules>> {
        if let Some(rules) = self.ruleset_cache.users.get(user) {
            return Ok(rules);
        }
        // Rules changed after this stamp are not kept as read below (see `ByteCache`).
        let stamp = self.ruleset_cache.users.stamp();
        let rules = Arc::new(self.ruleset_cache.prepare(user, self.push_rules(user).await?)?);
        self.ruleset_cache.users.insert_at(stamp, user.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Evaluates a new event for each local member of its room (other than its
    /// sender): whom it notifies, and for whom it highlights, as stored with it
    /// (`evaluate_grouped`: a row per template, and rows of their own for the members
    /// the event singles out). `state` is the room state the event is authorized
    /// against (it holds the create and power levels events); the caller stores the
    /// result with the event, under the room's lock, and then tells the cache the
    /// spans that moved (`PushMembersCache::spans_moved`).
    pub(crate) async fn push_actions_for(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        pdu_json: &str,
        state: &HashMap<(StateEventType, String), Pdu>,
        rules: &RoomVersionRules,
    ) -> Result<PushOutcome> {
        let mut members = self.room_push_members(room_id).await?;
        let joined_count = match members.joined_count {
            Some(count) => count,
            None => {
                let (joined, _) = self.store.count_room_members(room_id.as_str()).await?;
                let count = UInt::new(joined.max(0) as u64).unwrap_or(UInt::MAX);
                members = self.push_members_cache.set_joined_count(room_id, members, count);
                count
            }
        };
        if members.members.keys().all(|u| u.as_str() == sender.as_str()) {
            return Ok(PushOutcome::default());
        }
        let event: Raw<JsonValue> =
            Raw::from_json(RawValue::from_string(pdu_json.to_owned()).map_err(Error::internal)?);
        let event_json: JsonValue = serde_json::from_str(pdu_json).map_err(Error::internal)?;
        let mut base = PushConditionRoomCtx::new(room_id.to_owned(), joined_count, sender.to_owned(), String::new());
        base.power_levels = Some(push_power_levels(state, rules));
        // The members' rules as kept with them; those not kept (new members, or all
        // after a change of someone's rules) are looked up, and kept for the next event.
        // The generation is read before the rules: a change meanwhile looks again.
        let generation = self.ruleset_cache.generation();
        let mut looked_up: HashMap<OwnedUserId, Arc<UserRules>> = HashMap::new();
        loop {
            let current = members.rules_generation == generation;
            let missing: Vec<&OwnedUserId> = members
                .members
                .iter()
                .filter(|(u, m)| (!current || m.rules.is_none()) && !looked_up.contains_key(*u))
                .map(|(u, _)| u)
                .collect();
            if missing.is_empty() {
                break;
            }
            let cached = self.ruleset_cache.users.get_many(missing.iter().map(|u| u.as_ref() as &UserId));
            let mut found = Vec::with_capacity(missing.len());
            for (user, rules) in missing.into_iter().zip(cached) {
                let rules = match rules {
                    Some(rules) => rules,
                    None => self.cached_push_rules(user).await?,
                };
                found.push((user.clone(), rules));
            }
            looked_up.extend(found);
            self.push_members_cache.set_rules(room_id, members, generation, &looked_up);
            // The entry as changed (or as it is, when it changed meanwhile or is gone).
            members = self.room_push_members(room_id).await?;
        }
        let current = members.rules_generation == generation;
        let grouping = group_members(
            members
                .members
                .iter()
                // The sender is passed over by its id's length first: one comparison of
                // lengths is cheaper than reading each id.
                .filter(|(user, _)| user.as_str().len() != sender.as_str().len() || *user != sender)
                .filter_map(|(user, m)| {
                    let (rules, hints) = match m.rules.as_ref().filter(|_| current) {
                        Some((rules, hints)) => (&**rules, *hints),
                        None => {
                            let rules = looked_up.get(user)?;
                            (&**rules, RulesHints::of(rules))
                        }
                    };
                    Some(PushMember { user, display_name: &m.name, rules, span: m.span, hints, name_key: m.name_key })
                }),
            &event_json,
        );
        let sender_span = members.members.get(sender).and_then(|m| m.span);
        evaluate_grouped(grouping, sender, sender_span, &event, &base).await
    }

    /// The room's joined count and its local members' display names, cached until the
    /// room's membership changes (see `forget_member_cache`).
    async fn room_push_members(&self, room_id: &RoomId) -> Result<Arc<RoomPushMembers>> {
        if let Some(members) = self.push_members_cache.rooms.get(room_id) {
            return Ok(members);
        }
        // A membership change after this stamp may make what is read below stale.
        let stamp = self.push_members_cache.rooms.stamp();
        let local = self.joined_local_members(room_id).await?;
        let (joined, _) = self.store.count_room_members(room_id.as_str()).await?;
        let users: Vec<&OwnedUserId> = local.iter().collect();
        let mut names = self.display_names(room_id, &users).await?;
        let mut spans: HashMap<String, i64> =
            self.store.get_open_push_spans(room_id.as_str()).await?.into_iter().collect();
        let members = Arc::new(RoomPushMembers::new(
            Some(UInt::new(joined.max(0) as u64).unwrap_or(UInt::MAX)),
            local
                .iter()
                .map(|u| {
                    let name = names.remove(u.as_str()).unwrap_or_else(|| u.localpart().to_owned());
                    (u.clone(), RoomPushMember::new(name, spans.remove(u.as_str()), None))
                })
                .collect(),
            self.ruleset_cache.generation(),
        ));
        self.push_members_cache.rooms.insert_at(stamp, room_id.to_owned(), members.clone());
        Ok(members)
    }

    /// The display names that users have in a room (from their member events).
    async fn display_names(&self, room_id: &RoomId, users: &[&OwnedUserId]) -> Result<HashMap<String, String>> {
        let mut names = HashMap::with_capacity(users.len());
        for chunk in users.chunks(MEMBER_CHUNK) {
            let keys: Vec<(String, String)> =
                chunk.iter().map(|u| ("m.room.member".to_owned(), u.to_string())).collect();
            for event in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
                let json: JsonValue = serde_json::from_str(&event.json).map_err(Error::internal)?;
                if let (Some(user), Some(name)) = (event.state_key, json["content"]["displayname"].as_str()) {
                    names.insert(user, name.to_owned());
                }
            }
        }
        Ok(names)
    }
}

/// The room's power levels as the push rule conditions need them, from the state the
/// event is checked against.
fn push_power_levels(
    state: &HashMap<(StateEventType, String), Pdu>,
    rules: &RoomVersionRules,
) -> PushConditionPowerLevelsCtx {
    let content = |kind: StateEventType| -> JsonValue {
        state
            .get(&(kind, String::new()))
            .and_then(|pdu| serde_json::from_str(pdu.content.get()).ok())
            .unwrap_or(JsonValue::Null)
    };
    let pl = content(StateEventType::RoomPowerLevels);
    let users: BTreeMap<OwnedUserId, Int> = serde_json::from_value(pl["users"].clone()).unwrap_or_default();
    let users_default = pl["users_default"].as_i64().and_then(Int::new).unwrap_or_default();
    let notifications: NotificationPowerLevels = serde_json::from_value(pl["notifications"].clone())
        .or_else(|_| serde_json::from_value(serde_json::json!({})))
        .expect("the defaults of NotificationPowerLevels deserialize from {}");
    let mut creators = Vec::new();
    if let Some(create) = state.get(&(StateEventType::RoomCreate, String::new())) {
        creators.push(create.sender.clone());
        if let Some(more) = content(StateEventType::RoomCreate)["additional_creators"].as_array() {
            creators.extend(more.iter().filter_map(|c| c.as_str()).filter_map(|c| OwnedUserId::try_from(c).ok()));
        }
    }
    PushConditionPowerLevelsCtx::new(
        users,
        users_default,
        notifications,
        RoomPowerLevelsRules::new(&rules.authorization, creators),
    )
}

#[cfg(test)]
mod tests {
    use ruma::{
        owned_room_id, owned_user_id,
        push::{
            Action, EventMatchConditionData, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, PushCondition,
            RuleKind, Ruleset, Tweak,
        },
        room_version_rules::RoomVersionRules,
    };
    use serde_json::json;

    use super::*;

    fn ctx(member_count: u32) -> PushConditionRoomCtx {
        let sender = owned_user_id!("@sender:localhost");
        let mut ctx = PushConditionRoomCtx::new(
            owned_room_id!("!room:localhost"),
            UInt::from(member_count),
            sender.clone(),
            String::new(),
        );
        let notifications: NotificationPowerLevels = serde_json::from_value(json!({})).unwrap();
        ctx.power_levels = Some(PushConditionPowerLevelsCtx::new(
            BTreeMap::from([(sender.clone(), Int::from(100))]),
            Int::from(0),
            notifications,
            RoomPowerLevelsRules::new(&RoomVersionRules::V11.authorization, vec![sender]),
        ));
        ctx
    }

    /// Users with default rules, with the same custom rules, with rules that look at
    /// display names, and with notifications off.
    fn members(cache: &RulesetCache) -> Vec<(OwnedUserId, String, Arc<UserRules>, Ruleset)> {
        let keyword = |user: &UserId| {
            let mut rules = Ruleset::server_default(user);
            let rule = NewPatternedPushRule::new("pizza".into(), "pizza".into(), vec![Action::Notify]);
            rules.insert(NewPushRule::Content(rule), None, None).unwrap();
            rules
        };
        let by_name = |user: &UserId| {
            let mut rules = Ruleset::server_default(user);
            #[allow(deprecated)]
            let rule = NewConditionalPushRule::new(
                "by_name".into(),
                vec![PushCondition::ContainsDisplayName],
                vec![Action::Notify, Action::SetTweak(Tweak::Highlight(true.into()))],
            );
            rules.insert(NewPushRule::Override(rule), None, None).unwrap();
            rules
        };
        // A rule that names its own user: equal templates, rulesets that differ.
        let own_id = |user: &UserId| {
            let mut rules = Ruleset::server_default(user);
            let rule = NewConditionalPushRule::new(
                "own_id".into(),
                vec![PushCondition::EventMatch(EventMatchConditionData::new(
                    "content.body".into(),
                    format!("*{user}*"),
                ))],
                vec![Action::Notify, Action::SetTweak(Tweak::Highlight(true.into()))],
            );
            rules.insert(NewPushRule::Override(rule), None, None).unwrap();
            rules
        };
        let silent = |user: &UserId| {
            let mut rules = Ruleset::server_default(user);
            rules.set_enabled(RuleKind::Override, ".m.rule.master", true).unwrap();
            rules
        };
        type MakeRules = Box<dyn Fn(&UserId) -> Ruleset>;
        let users: Vec<(&str, &str, MakeRules)> = vec![
            ("@alice:localhost", "Alice", Box::new(Ruleset::server_default)),
            ("@bob:localhost", "Bob", Box::new(Ruleset::server_default)),
            ("@carol:localhost", "Carol", Box::new(Ruleset::server_default)),
            ("@dave:localhost", "Dave", Box::new(keyword)),
            ("@erin:localhost", "Erin", Box::new(keyword)),
            ("@frank:localhost", "Frank", Box::new(by_name)),
            ("@grace:localhost", "Grace", Box::new(by_name)),
            ("@heidi:localhost", "", Box::new(by_name)),
            ("@ivan:localhost", "Ivan", Box::new(silent)),
            ("@Judy:localhost", "Σίσυφος", Box::new(by_name)),
            ("@kim:localhost", "Kim", Box::new(own_id)),
            ("@lee:localhost", "Lee", Box::new(own_id)),
            ("@judy:localhost", "Judy", Box::new(by_name)),
        ];
        users
            .into_iter()
            .map(|(user, name, rules)| {
                let user = OwnedUserId::try_from(user).unwrap();
                let own = rules(&user);
                let rules = Arc::new(cache.prepare(&user, own.clone()).unwrap());
                (user, name.to_owned(), rules, own)
            })
            .collect()
    }

    fn events() -> Vec<JsonValue> {
        let message = |content: JsonValue| json!({"type": "m.room.message", "sender": "@sender:localhost", "room_id": "!room:localhost", "content": content});
        vec![
            message(json!({"msgtype": "m.text", "body": "hello"})),
            message(json!({"msgtype": "m.notice", "body": "a notice"})),
            message(json!({"msgtype": "m.text", "body": "hi", "m.mentions": {"user_ids": ["@bob:localhost"]}})),
            message(json!({"msgtype": "m.text", "body": "hi BOB", "m.mentions": {"user_ids": ["@BOB:localhost"]}})),
            message(json!({"msgtype": "m.text", "body": "hi", "m.mentions": {"room": true}})),
            message(json!({"msgtype": "m.text", "body": "Frank, Carol and grace: lunch?"})),
            message(json!({"msgtype": "m.text", "body": "σίσυφος wants pizza"})),
            message(json!({"msgtype": "m.text", "body": "PIZZA for @alice:localhost"})),
            message(json!({"msgtype": "m.text", "body": "pizza", "m.mentions": {}})),
            message(json!({"msgtype": "m.text", "body": "", "m.mentions": {"user_ids": ["@judy:localhost"]}})),
            message(json!({"msgtype": "m.text", "body": "ask @kim:localhost"})),
            message(json!({"msgtype": "m.text", "body": "ask @LEE:localhost"})),
            json!({"type": "m.room.encrypted", "sender": "@sender:localhost", "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"}}),
            json!({"type": "m.room.member", "sender": "@sender:localhost", "state_key": "@alice:localhost", "content": {"membership": "invite"}}),
            json!({"type": "m.room.member", "sender": "@sender:localhost", "state_key": "@sender:localhost", "content": {"membership": "join"}}),
            json!({"type": "m.reaction", "sender": "@sender:localhost", "content": {}}),
            json!({"type": "m.room.tombstone", "sender": "@sender:localhost", "state_key": "", "content": {"body": "moved"}}),
        ]
    }

    /// The estimates of what a ruleset and a room's push members take are not below the
    /// heap they really take (counted by the tests' allocator), nor far above it.
    #[test]
    fn estimates_are_not_below_the_heap_taken() {
        use crate::service::cache::heap::bytes_of;
        let cache = RulesetCache::new(1 << 20, 1 << 20);
        let user = |i: usize| OwnedUserId::try_from(format!("@user{i}:example.org")).unwrap();
        // The first makes the template; the others share it.
        cache.prepare(&user(0), Ruleset::server_default(&user(0))).unwrap();
        for i in 1..4 {
            let mut estimate = 0;
            let taken = bytes_of(|| {
                let rules = Arc::new(cache.prepare(&user(i), Ruleset::server_default(&user(i))).unwrap());
                estimate = weigh_rules(&user(i), &rules);
                rules
            });
            eprintln!("ruleset: estimate {estimate}, taken {taken}");
            assert!(estimate >= taken && estimate < 3 * taken, "ruleset: estimate {estimate}, taken {taken}");
        }
        for n in [1, 10, 300] {
            let mut estimate = 0;
            let taken = bytes_of(|| {
                let members = Arc::new(RoomPushMembers::new(
                    Some(UInt::from(n as u32)),
                    (0..n)
                        .map(|i| {
                            let name = format!("User number {i}");
                            (user(i), RoomPushMember::new(name, Some(i as i64), None))
                        })
                        .collect(),
                    0,
                ));
                let room = owned_room_id!("!abcdefghijklmnop:example.org");
                estimate = weigh_push_members(&room, &members);
                (room, members)
            });
            eprintln!("{n} push members: estimate {estimate}, taken {taken}");
            assert!(estimate >= taken && estimate < 3 * taken, "{n} push members: estimate {estimate}, taken {taken}");
        }
    }

    /// Filled past their bounds, both maps stay under them, and a user's rules (and
    /// template) come back the same when prepared again after eviction.
    #[test]
    fn ruleset_cache_stays_under_its_bounds() {
        // A user's entry is small (the rules are their template's): 400 users fill it.
        let cache = RulesetCache::new(20_000, 10_000);
        let user = |i: usize| OwnedUserId::try_from(format!("@user{i}:example.org")).unwrap();
        let mut first = None;
        for i in 0..400 {
            let mut rules = Ruleset::server_default(&user(i));
            // Every fifth user has rules of their own (a template of their own).
            if i % 5 == 0 {
                let rule = NewPatternedPushRule::new(format!("word{i}"), format!("word{i}"), vec![Action::Notify]);
                rules.insert(NewPushRule::Content(rule), None, None).unwrap();
            }
            let prepared = Arc::new(cache.prepare(&user(i), rules).unwrap());
            cache.users.insert(user(i), prepared.clone());
            first.get_or_insert(prepared);
            for (bytes, bound) in cache.bytes() {
                assert!(bytes <= bound, "{bytes} bytes over {bound}");
            }
        }
        assert!(cache.users.get(&user(0)).is_none(), "the first user's rules were evicted");
        let again = cache.prepare(&user(0), {
            let mut rules = Ruleset::server_default(&user(0));
            let rule = NewPatternedPushRule::new("word0".into(), "word0".into(), vec![Action::Notify]);
            rules.insert(NewPushRule::Content(rule), None, None).unwrap();
            rules
        });
        let (first, again) = (first.unwrap(), again.unwrap());
        assert_eq!(
            serde_json::to_string(&*first.own(&user(0)).unwrap()).unwrap(),
            serde_json::to_string(&*again.own(&user(0)).unwrap()).unwrap()
        );
        assert_eq!((first.bytes, &first.folded_id), (again.bytes, &again.folded_id));
        assert!(again.template().is_some());
    }

    /// Grouping members by template answers exactly what evaluating each member's rules
    /// on their own answers, in a one-to-one room and in a group, whatever the members'
    /// spans: a member's answer is their own row, else their span's template row. The
    /// sender's is nothing, and the members whose span is not their template move.
    #[tokio::test]
    async fn grouped_evaluation_equals_one_by_one() {
        let cache = RulesetCache::new(1 << 20, 1 << 20);
        let members = members(&cache);
        assert_eq!(members[0].2.template(), members[1].2.template(), "default rules share a template");
        assert_eq!(members[3].2.template(), members[4].2.template(), "equal custom rules share a template");
        assert_ne!(members[0].2.template(), members[3].2.template());
        assert_eq!(members[10].2.template(), members[11].2.template(), "rules naming their own users");
        let sender = owned_user_id!("@sender:localhost");
        let templates: Vec<(OwnedUserId, Option<i64>)> =
            members.iter().map(|(user, _, rules, _)| (user.clone(), rules.template())).collect();
        let default = members[0].2.template().unwrap();
        // Everyone where their rules say, the sender too; nobody yet; every other one
        // off (no span, or another template's).
        let steady: HashMap<OwnedUserId, i64> =
            templates.iter().filter_map(|(u, t)| Some((u.clone(), (*t)?))).chain([(sender.clone(), default)]).collect();
        let mixed: HashMap<OwnedUserId, i64> = templates
            .iter()
            .enumerate()
            .filter_map(|(i, (u, t))| match i % 3 {
                0 => Some((u.clone(), (*t)?)),
                1 => Some((u.clone(), default)),
                _ => None,
            })
            .collect();
        let mut highlights = 0;
        let mut group_rows = 0;
        for spans in [steady, HashMap::new(), mixed] {
            for member_count in [2, 10] {
                let base = ctx(member_count);
                let recipients: Vec<PushMember<'_>> = members
                    .iter()
                    .map(|(user, name, rules, _)| PushMember {
                        user,
                        display_name: name,
                        rules,
                        span: spans.get(user).copied(),
                        hints: RulesHints::of(rules),
                        name_key: name_key(name),
                    })
                    .collect();
                let sender_span = spans.get(&sender).copied();
                for event_json in events() {
                    let event: Raw<JsonValue> = Raw::from_json(RawValue::from_string(event_json.to_string()).unwrap());
                    let outcome = evaluate_grouped(
                        group_members(recipients.iter().copied(), &event_json),
                        &sender,
                        sender_span,
                        &event,
                        &base,
                    )
                    .await
                    .unwrap();
                    group_rows += outcome.groups.len();
                    let answer_of = |user: &UserId| -> Option<(bool, String)> {
                        if let Some(row) = outcome.own.iter().find(|r| r.user_id == user.as_str()) {
                            return row.notifies.then(|| (row.highlight, row.actions.clone()));
                        }
                        let template = spans.get(user)?;
                        let group = outcome.groups.iter().find(|g| g.template == *template)?;
                        Some((group.highlight, group.actions.clone()))
                    };
                    for (member, (.., own)) in recipients.iter().zip(&members) {
                        let alone = evaluate_one(member, own, &event, &base).await.unwrap();
                        let alone = alone.map(|(h, a)| (h, a.to_string()));
                        highlights += usize::from(alone.as_ref().is_some_and(|a| a.0));
                        assert_eq!(answer_of(member.user), alone, "{} for {event_json}", member.user);
                    }
                    assert_eq!(answer_of(&sender), None, "the sender for {event_json}");
                    let moved: Vec<SpanChange> = templates
                        .iter()
                        .filter(|(u, t)| spans.get(u).copied() != *t)
                        .map(|(u, t)| SpanChange { user_id: u.to_string(), template: *t })
                        .collect();
                    assert_eq!(outcome.spans, moved);
                }
            }
        }
        assert!(highlights > 5, "the events highlight for some members");
        assert!(group_rows > 10, "template rows answer for some members");
    }

    /// A room of ten thousand members, with their rules and spans kept, stays cached
    /// under the default budget (an entry over half of its cache is not kept, and the
    /// room would be read again for every event).
    #[test]
    fn a_room_of_ten_thousand_members_stays_cached() {
        let budget = crate::service::cache::CacheBudget::new(&crate::config::Caches::default());
        let rulesets = RulesetCache::new(1 << 30, 1 << 30);
        let cache = PushMembersCache::new(budget.bytes(crate::service::cache::shares::PUSH_MEMBERS));
        let user = |i: usize| OwnedUserId::try_from(format!("@member{i}:example.org")).unwrap();
        let members: HashMap<OwnedUserId, RoomPushMember> = (0..10_000)
            .map(|i| {
                let rules = Arc::new(rulesets.prepare(&user(i), Ruleset::server_default(&user(i))).unwrap());
                (user(i), RoomPushMember::new(format!("Member {i}"), Some(1), Some(rules)))
            })
            .collect();
        let room = owned_room_id!("!large:example.org");
        let entry = Arc::new(RoomPushMembers::new(Some(UInt::from(10_000u32)), members, 0));
        eprintln!("{} bytes of {}", weigh_push_members(&room, &entry), cache.bytes().1);
        cache.rooms.insert(room.clone(), entry);
        assert!(cache.members_of(&room).is_some(), "the room is cached");
        cache.member_changed(&room, &user(10_000), true, true, None);
        assert!(cache.members_of(&room).is_some_and(|m| m.has(user(10_000).as_str())), "and changed in place");
        // The heap bytes kept as members change are what counting them again gives.
        let heap_is_counted = |why: &str| {
            let m = cache.members_of(&room).unwrap();
            assert_eq!(m.heap, m.count_heap(), "{why}");
        };
        heap_is_counted("a join");
        let rules = Arc::new(rulesets.prepare(&user(10_000), Ruleset::server_default(&user(10_000))).unwrap());
        let members = cache.members_of(&room).unwrap();
        cache.set_rules(&room, members, 0, &HashMap::from([(user(10_000), rules.clone())]));
        heap_is_counted("rules kept");
        let members = cache.members_of(&room).unwrap();
        cache.set_rules(&room, members, 1, &HashMap::from([(user(3), rules)]));
        heap_is_counted("a new generation of rules");
        cache.member_changed(&room, &user(5), true, true, Some("A much longer display name than before".into()));
        heap_is_counted("a new name");
        cache.member_changed(&room, &user(6), true, false, None);
        heap_is_counted("a leave");
        assert!(cache.members_of(&room).is_some_and(|m| !m.has(user(6).as_str()) && m.members.len() == 10_000));
    }

    /// The binary search over `@` tails and the ASCII name match answer as plain scans
    /// of the folded strings and body do, for ids and names inside, across and beside
    /// the events' strings; the id hashes and body pairs never rule out a match.
    #[test]
    fn event_text_lookups_answer_as_scans() {
        let mut events = events();
        events.push(json!({"type": "m.room.message", "sender": "@s:x", "content": {
            "body": "mail @Bob:Localhost.evil, or @bob:localhost! (Ünïcode Næme)", "x": ["@a", "b@c:d"]}}));
        let ids = [
            "@bob:localhost",
            "@bob:localhost.evil",
            "@bob:local",
            "@bo",
            "@alice:localhost",
            "@sender:localhost",
            "@s:x",
            "@a",
            "@c:d",
            "@kim:localhost",
            "@lee:localhost",
            "@zed:localhost",
            "@",
            "@bob:localhost!",
        ];
        let names = ["Bob", "bob", "BOB ", "Frank", "carol and", "Σίσυφος", "Ünïcode Næme", "pizza", "", "Zed", "k"];
        for event in &events {
            let text = EventText::of(event);
            let mut strings = String::new();
            fn walk(value: &JsonValue, out: &mut String) {
                match value {
                    JsonValue::String(s) => out.push_str(&format!("{}\0", fold(s))),
                    JsonValue::Array(items) => items.iter().for_each(|v| walk(v, out)),
                    JsonValue::Object(map) => map.iter().for_each(|(k, v)| {
                        out.push_str(&format!("{}\0", fold(k)));
                        walk(v, out)
                    }),
                    _ => {}
                }
            }
            walk(event, &mut strings);
            for id in ids {
                let id = fold(id);
                assert_eq!(text.holds(&id), strings.contains(&id), "{id} in {event}");
                // The hash filter never rules out an id the event holds.
                if text.holds(&id) {
                    assert!(text.tail_hashes.binary_search(&id_hash(&id)).is_ok(), "{id}'s hash in {event}");
                }
            }
            for name in names {
                let scan = text.body.as_deref().is_some_and(|b| b.contains(fold(name).as_str()));
                assert_eq!(text.body_holds_name(name), scan, "{name:?} in {event}");
                // Nor does the pair filter a name the body holds.
                if let (true, Some(key)) = (scan, name_key(name)) {
                    let pairs = text.body_pairs.as_ref().expect("a body has its pairs");
                    let key = usize::from(key);
                    assert!(pairs[key / 64] & (1 << (key % 64)) != 0, "{name:?}'s first pair in {event}");
                }
            }
        }
    }

    /// A room of ten thousand members stays cached (the cache does not start over on
    /// every event), and users with equal rules share one parsed ruleset.
    #[test]
    fn ten_thousand_users_stay_cached_and_share_their_rules() {
        // The default shares of the default `[caches] memory_mb`.
        let budget = crate::service::cache::CacheBudget::new(&crate::config::Caches::default());
        let cache = RulesetCache::new(
            budget.bytes(crate::service::cache::shares::PUSH_RULESETS),
            budget.bytes(crate::service::cache::shares::PUSH_TEMPLATES),
        );
        let users: Vec<OwnedUserId> =
            (0..10_000).map(|i| OwnedUserId::try_from(format!("@member{i}:localhost")).unwrap()).collect();
        for user in &users {
            let rules = Arc::new(cache.prepare(user, Ruleset::server_default(user)).unwrap());
            cache.users.insert(user.clone(), rules);
        }
        let first = cache.get(&users[0]).expect("the first user is still cached");
        for user in &users {
            let rules = cache.get(user).expect("every user is still cached");
            match (&rules.rules, &first.rules) {
                (Rules::Shared(a), Rules::Shared(b)) => assert!(Arc::ptr_eq(a, b), "{user} shares the ruleset"),
                _ => panic!("default rules have a template"),
            }
        }
        assert_eq!(cache.templates.len(), 1);
        // A user's own ruleset, read back from the template, is theirs.
        let own = cache.get(&users[7]).unwrap().own(&users[7]).unwrap().into_owned();
        assert_eq!(
            serde_json::to_value(own).unwrap(),
            serde_json::to_value(Ruleset::server_default(&users[7])).unwrap()
        );
    }
}
