//! The hardening suite: faults (libvirtd restarting, the VM storage filling up, the store
//! lost or corrupted), VPSes coming back after a QEMU crash and a host reboot, the systemd protocol and the admin socket, sustained load on a host
//! with 20 VMs, and a schema-driven fuzz of the whole API.
//!
//! It restarts libvirtd and measures, so it runs after the e2e suite, one test at a time
//! (`tests/run` passes `--test-threads=1`), on the same rig.

#[path = "../e2e/harness.rs"]
mod harness;

mod api_fuzz;
mod comeback;
mod daemon;
mod faults;
mod load;
mod vlan;
