//! Convo, a Matrix homeserver.
//!
//! Layers: `http` (thin handlers speaking ruma types) → `service` (the Matrix logic)
//! → `storage` (all SQL, SQLite and PostgreSQL). `server` wires them together.

pub mod admin;
pub mod config;
pub mod error;
pub mod http;
pub mod logging;
pub mod server;
pub mod service;
pub mod storage;
