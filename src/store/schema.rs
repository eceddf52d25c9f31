//! Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: VM records, tasks with their step journal, IP allocations, template checks.
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        template_id TEXT NOT NULL,
        cpu_cores INTEGER NOT NULL,
        ram_mb INTEGER NOT NULL,
        disk_gb INTEGER NOT NULL,
        bandwidth_mbps INTEGER,
        password_hash TEXT NOT NULL,
        ssh_keys TEXT NOT NULL,
        ip_address TEXT,
        mac TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        webhook_url TEXT,
        webhook_secret TEXT,
        instance_id TEXT NOT NULL,
        request_digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        deployed_at TEXT
    );
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        vps_id TEXT NOT NULL,
        state TEXT NOT NULL,
        input TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        error_code TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT
    );
    CREATE INDEX tasks_by_vps ON tasks(vps_id, created_at);
    CREATE INDEX tasks_by_state ON tasks(state);
    CREATE TABLE task_steps (
        task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        ord INTEGER NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        error TEXT,
        PRIMARY KEY (task_id, ord)
    );
    CREATE TABLE ip_allocations (
        address TEXT PRIMARY KEY,
        vps_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX ip_allocations_by_vps ON ip_allocations(vps_id);
    CREATE TABLE template_checks (
        template_id TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        verified_at TEXT NOT NULL
    );",
    // 2: the webhook outbox.
    "CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY,
        dedupe_key TEXT NOT NULL UNIQUE,
        vps_id TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        delivered_at TEXT,
        abandoned_at TEXT,
        last_error TEXT
    );
    CREATE INDEX webhooks_due ON webhooks(next_attempt_ms)
        WHERE delivered_at IS NULL AND abandoned_at IS NULL;",
    // 3: private networks and their members.
    "CREATE TABLE private_networks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        vni INTEGER NOT NULL UNIQUE,
        subnet TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE memberships (
        id TEXT PRIMARY KEY,
        network_id TEXT NOT NULL REFERENCES private_networks(id),
        vps_id TEXT NOT NULL,
        address TEXT NOT NULL,
        mac TEXT NOT NULL UNIQUE,
        nic INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (network_id, vps_id),
        UNIQUE (network_id, address),
        UNIQUE (vps_id, nic)
    );
    CREATE INDEX memberships_by_vps ON memberships(vps_id);",
    // 4: snapshots (internal qcow2 snapshots of each VM's disk) and what the disk held.
    "CREATE TABLE snapshots (
        vps_id TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        vmstate INTEGER NOT NULL,
        state TEXT NOT NULL,
        disk_bytes INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        PRIMARY KEY (vps_id, name)
    );",
    // 5: the store's identity, which the VM directory records too (see `Store::claim_dir`),
    // so that a lost or replaced database is noticed instead of silently starting empty.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(16))));",
    // 6: an address being taken away from its VM: still held (never handed out), but no
    // longer in the VM's filter or seed.
    // What each VM's snapshots held on disk when last measured (counted against the
    // node's storage with its disk).
    "ALTER TABLE ip_allocations ADD COLUMN releasing INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN snapshot_bytes INTEGER NOT NULL DEFAULT 0;",
    // 7: the power state the control plane last asked for, whether the VM comes back by
    // itself, and why it last stopped. VMs from before have no row: the agent takes their
    // state from libvirt at its next start (never starting one that was off).
    "CREATE TABLE power (
        vps_id TEXT PRIMARY KEY,
        intended TEXT NOT NULL,
        autostart INTEGER NOT NULL DEFAULT 1,
        last_stop_reason TEXT,
        updated_at TEXT NOT NULL
    );",
];

/// Applies the migrations not yet applied; returns how many had been applied before (0: the
/// database was new or empty).
pub fn migrate(conn: &Connection) -> rusqlite::Result<usize> {
    let applied: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if applied > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {applied} is newer than this agent knows ({}); \
             refusing to run an older agent against it",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(applied)
}
