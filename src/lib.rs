//! s3-exchange: trade files with another organisation through a bucket it owns.
//!
//! The outbox half uploads settled files to `Submissions/` with the canned ACL
//! `bucket-owner-full-control` (so the bucket owner can read them); the inbox half brings
//! what the owner puts under `Delivery/` into the inbox, whole and exactly once, remembering
//! what it fetched in a sled ledger. `main.rs` is a thin shell over [`daemon`].
//!
//! Data flows one way through each half:
//! file -> [`plan`] -> [`store`] -> [`ledger`] for the outbox,
//! object -> [`plan`] -> [`store`] -> [`localfs`] -> [`ledger`] for the inbox.
//!
//! The library exists for the binary and its tests, so its documentation is read with
//! `cargo doc --document-private-items`, where links to private items resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod check;
pub mod claim;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod group_commit;
pub mod inbox;
pub mod init;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod localfs;
pub mod logging;
pub mod md5;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod plan;
pub mod sdnotify;
pub mod status;
pub mod store;
pub mod upload;
pub mod watcher;
