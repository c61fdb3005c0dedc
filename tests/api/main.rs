//! Integration tests of the client-server API: a real server on loopback, spoken to
//! over HTTP, on SQLite and on PostgreSQL.

mod common;

mod account;
mod bad_input;
mod cli;
mod dag;
mod dehydrated_devices;
mod devices;
mod discovery;
mod ephemeral;
mod federation;
mod federation_edus;
mod federation_events;
mod federation_rooms;
mod federation_sender;
mod key_backups;
mod keys;
mod knock;
mod login;
mod media;
mod memcap;
mod openid;
mod operations;
mod profile;
mod push;
mod push_groups;
mod pushers;
mod register;
mod relations;
mod room_events;
mod room_size_cost;
mod rooms;
mod search;
mod signatures;
mod stream;
mod sync;
mod sync_skip;
mod timestamp;
mod transport;
mod unread;
