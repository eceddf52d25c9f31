//! hvnode: the agent that makes a VPS platform's VMs real on one KVM host.
//!
//! The control plane decides what should exist; hvnode makes it exist here and reports back.
//! `daemon` wires the pieces: the SQLite `store`, the libvirt `hypervisor`, the template
//! `storage`, the durable `tasks` engine that runs every long `vm` operation, and the `api`
//! served on TCP (control plane, bearer tokens) and a Unix socket (local admins, peer
//! credentials). `ctl` is the admin CLI, a client of that socket.

pub mod api;
pub mod app;
pub mod cloudinit;
pub mod config;
pub mod console;
pub mod ctl;
pub mod daemon;
pub mod errors;
pub mod hypervisor;
pub mod metrics;
pub mod network;
pub mod node;
pub mod numbers;
pub mod secret;
pub mod storage;
pub mod store;
pub mod tasks;
pub mod time;
pub mod vm;
