//! The slow suite: real agent processes, real libvirtd in the rig's namespace, real guests
//! booting from the Debian template under TCG. Bring the rig up first (`tests/rig/up`);
//! `tests/run` does that and then runs this with `--features rig`.
//!
//! Guests take a minute or more to boot here, so every test boots the guests it needs at
//! once and checks as much as it can on them.

mod concurrency;
mod console;
mod crash;
mod edge;
mod frames;
mod guest_actions;
mod harness;
mod hung_qemu;
mod isolation;
mod lifecycle;
mod network;
mod reconcile;
mod reinstall_resize;
mod snapshots;
mod tenancy;
mod tokens;
