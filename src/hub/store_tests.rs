//! The durable embedded hub: what survives a restart, a crash (the
//! persister abandoned with records not yet committed), and when callers
//! and command issuers learn of a change.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{StoreError, StoreSettings};
use crate::hub::{
    AuthContext, Command, CommandKind, CommandOutcome, CommandResult, ConnectionRef, Connections,
    Content, EventKind, Hub, HubError, HubMessage, MemoryHub, Online, Protocol, ResourceChange,
    Status, StoredLink, TwinState,
};
use crate::ocf::rd::Policy;

const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
const D2: &str = "0f4a5ea1-6b6e-4d7b-8e52-1b4c5c2b9a10";

fn ctx(owner: &str, device: &str) -> AuthContext {
    AuthContext {
        owner: owner.into(),
        device_id: device.into(),
        subject: Some("sub".into()),
        token_id: Some("jti".into()),
    }
}

fn online(c: u128) -> Online {
    Online {
        connection: ConnectionRef(c),
        connected_at_ns: 42,
        protocol: Protocol::CoapsTcp,
        service_id: "svc".into(),
        connection_id: "127.0.0.1:1".into(),
    }
}

fn link(device: &str, href: &str) -> StoredLink {
    StoredLink {
        href: href.into(),
        device_id: device.into(),
        instance_id: crate::ocf::rd::instance_id(href),
        resource_types: Some(vec!["core.light".into()]),
        interfaces: Some(vec!["oic.if.baseline".into()]),
        policy: Some(Policy {
            bit_mask: 3,
            port: None,
            tcp_port: Some(5683),
            tls_port: None,
            secured: Some(true),
        }),
        endpoints: Some(vec![("coaps+tcp://[::1]:1".into(), Some(1))]),
        anchor: Some(format!("ocf://{device}")),
        title: Some("light".into()),
        content_types: None,
        valid_until: None,
    }
}

fn change(href: &str, value: &[u8], seq: u64) -> ResourceChange {
    ResourceChange {
        href: href.into(),
        content: Content {
            data: value.to_vec(),
            content_format: 60,
        },
        status: Status::Ok,
        etag: Some(vec![seq as u8]),
        resource_types: vec!["core.light".into()],
        sequence: seq,
    }
}

fn command(device: &str, id: &str, href: &str) -> Command {
    Command {
        correlation_id: id.into(),
        device_id: device.into(),
        href: href.into(),
        kind: CommandKind::Update {
            content: Content {
                data: b"{\"on\":true}".to_vec(),
                content_format: 50,
            },
        },
        interface: Some("oic.if.baseline".into()),
        valid_until_ns: 0,
        issued_at_ns: 0,
    }
}

/// A transport that takes every message (the session got it).
#[derive(Default)]
struct Taking(Mutex<Vec<(ConnectionRef, HubMessage)>>);

impl Connections for Taking {
    fn close(&self, _: ConnectionRef, _: &str) {}
    fn deliver(&self, c: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        self.0.lock().unwrap().push((c, message));
        Ok(())
    }
}

/// Device-side batches never commit on their own within a test.
fn slow() -> StoreSettings {
    StoreSettings {
        commit_interval: Duration::from_secs(60),
        ..StoreSettings::default()
    }
}

#[test]
fn devices_links_twin_commands_and_settings_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (links_before, twin_before, pending_before, record_before);
    {
        let hub = MemoryHub::open(dir.path()).unwrap();
        assert!(hub.is_durable());
        let c = ctx("alice", D);
        hub.add_device(&c).unwrap();
        hub.add_device(&ctx("bob", D2)).unwrap();
        hub.publish(&c, vec![link(D, "/a"), link(D, "/b"), link(D, "/c")])
            .unwrap();
        hub.unpublish(&c, &[crate::ocf::rd::instance_id("/c")], 0)
            .unwrap();
        hub.set_online(&c, online(1)).unwrap();
        hub.set_local_endpoints(D, ConnectionRef(1), vec!["coaps+tcp://[::1]:1".into()]);
        hub.resources_changed(
            &c,
            ConnectionRef(1),
            vec![change("/a", b"1", 1), change("/b", b"x", 2)],
        )
        .unwrap();
        hub.resources_changed(&c, ConnectionRef(1), vec![change("/a", b"2", 3)])
            .unwrap();
        hub.set_twin_state(&c, ConnectionRef(1), TwinState::InSync);
        // No transport: the command waits for the device.
        let ticket = hub
            .submit_command("alice", command(D, "cmd-1", "/a"))
            .unwrap();
        assert!(ticket.pending);
        hub.submit_command("alice", command(D, "cmd-2", "/b"))
            .unwrap();
        hub.set_twin_enabled("bob", D2, false, false).unwrap();
        links_before = hub.links("alice", &[], &[], 0);
        twin_before = hub.resources("alice", D).unwrap();
        pending_before = hub.pending_commands("alice", D).unwrap();
        record_before = hub.device("alice", D).unwrap();
        assert_eq!(twin_before[0].version, 1);
        // Dropped: a clean close.
    }
    let hub = MemoryHub::open(dir.path()).unwrap();
    assert!(hub.owns("alice", D) && hub.owns("bob", D2) && !hub.owns("bob", D));
    assert_eq!(hub.links("alice", &[], &[], 0), links_before);
    assert_eq!(links_before[0].1.len(), 2);
    assert_eq!(hub.resources("alice", D).unwrap(), twin_before);
    assert_eq!(hub.pending_commands("alice", D).unwrap(), pending_before);
    assert_eq!(pending_before.len(), 2);
    assert!(!hub.twin_enabled(D2));
    assert_eq!(
        hub.device("bob", D2).unwrap().twin.state,
        TwinState::Disabled
    );
    assert!(hub.twin_enabled(D));
    // spec §8.2: the process died, so the device is OFFLINE; the rest of
    // its record is as it was.
    let record = hub.device("alice", D).unwrap();
    assert!(record_before.status.online);
    assert!(!record.status.online);
    let mut expected = record_before.clone();
    expected.status.online = false;
    assert_eq!(record, expected);
    assert_eq!(
        hub.latest_etags(D, 1),
        vec![vec![3u8]],
        "the newest ETag is /a's"
    );
    // The event log carries on, with the restart's OFFLINE at its end.
    let events = hub.events_after("alice", 0, 1000).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names,
        [
            "device_registered",
            "links_published",
            "links_unpublished",
            "online",
            "resource_changed",
            "resource_changed",
            "resource_changed",
            "twin_state",
            "command_pending",
            "command_pending",
            "offline"
        ]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(events[0].auth, ctx("alice", D));
    assert!(matches!(
        &events[6].kind,
        EventKind::ResourceChanged { version: 1, href, .. } if href == "/a"
    ));
    let last = events.last().unwrap().seq;
    let rx = hub.subscribe("alice");
    hub.add_device(&ctx("alice", "other")).unwrap();
    assert!(rx.try_recv().unwrap().seq > last);
    assert_eq!(hub.events_after("bob", 0, 1000).unwrap().len(), 2);
}

#[test]
fn a_dispatched_unanswered_command_is_unavailable_after_a_crash_and_a_pending_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, c2) = (ctx("alice", D), ctx("alice", D2));
    {
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        let taking = Arc::new(Taking::default());
        hub.set_connections(taking.clone());
        hub.add_device(&c1).unwrap();
        hub.add_device(&c2).unwrap();
        hub.publish(&c1, vec![link(D, "/a")]).unwrap();
        hub.set_online(&c1, online(1)).unwrap();
        // Handed to the online device's connection: sent.
        let sent = hub
            .submit_command("alice", command(D, "sent", "/a"))
            .unwrap();
        assert!(!sent.pending);
        assert_eq!(taking.0.lock().unwrap().len(), 1);
        // D2 is offline: pending.
        let pending = hub
            .submit_command("alice", command(D2, "waits", "/a"))
            .unwrap();
        assert!(pending.pending);
        hub.abandon();
    }
    let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
    let taking = Arc::new(Taking::default());
    hub.set_connections(taking.clone());
    assert!(hub.pending_commands("alice", D).unwrap().is_empty());
    assert_eq!(hub.stats().answered(Status::Unavailable), 1);
    let events = hub.events_after("alice", 0, 1000).unwrap();
    let answered: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CommandAnswered {
                correlation_id,
                status,
                ..
            } => Some((correlation_id.as_str(), *status)),
            _ => None,
        })
        .collect();
    assert_eq!(answered, [("sent", Status::Unavailable)]);
    assert_eq!(
        events.last().unwrap().kind,
        EventKind::Offline,
        "the device online at the crash"
    );
    // The pending one is still pending, and a new connection takes it.
    let waiting = hub.pending_commands("alice", D2).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].correlation_id, "waits");
    hub.publish(&c2, vec![link(D2, "/a")]).unwrap();
    hub.set_online(&c2, online(7)).unwrap();
    let taken = hub.take_pending_commands(&c2, ConnectionRef(7), 1);
    assert_eq!(taken, waiting);
    // Taken = dispatched, on disk before the session got it: a crash now
    // makes it UNAVAILABLE too, never sent twice.
    hub.abandon();
    let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
    assert!(hub.pending_commands("alice", D2).unwrap().is_empty());
    assert_eq!(hub.stats().answered(Status::Unavailable), 1);
}

#[test]
fn api_changes_are_durable_when_the_call_returns_device_changes_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx("alice", D);
    {
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        hub.add_device(&c).unwrap();
        hub.publish(&c, vec![link(D, "/a")]).unwrap();
        hub.set_online(&c, online(1)).unwrap();
        hub.submit_command("alice", command(D, "one", "/a"))
            .unwrap();
        hub.submit_command("alice", command(D, "two", "/a"))
            .unwrap();
        // Device-side, after the last API call: not committed yet when
        // the process dies.
        hub.resources_changed(&c, ConnectionRef(1), vec![change("/a", b"1", 1)])
            .unwrap();
        assert_eq!(hub.resources("alice", D).unwrap().len(), 1);
        hub.abandon();
    }
    {
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        // Queued before the API calls: committed with them.
        assert_eq!(hub.links("alice", &[], &[], 0).len(), 1);
        // The connection refused them (no transport): pending.
        let ids: Vec<String> = hub
            .pending_commands("alice", D)
            .unwrap()
            .into_iter()
            .map(|c| c.correlation_id)
            .collect();
        assert_eq!(ids, ["one", "two"]);
        assert!(hub.resources("alice", D).unwrap().is_empty());
        hub.cancel_command("alice", D, "one").unwrap();
        hub.set_twin_enabled("alice", D, false, false).unwrap();
        hub.abandon();
    }
    {
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        let pending = hub.pending_commands("alice", D).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].correlation_id, "two");
        assert!(!hub.twin_enabled(D));
        hub.delete_device("alice", D).unwrap();
        hub.abandon();
    }
    let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
    assert!(hub.devices("alice").is_empty());
    // Its links and commands went with it: registered anew, it is empty.
    hub.add_device(&ctx("bob", D)).unwrap();
    assert!(hub.links("bob", &[], &[], 0).is_empty());
    assert!(hub.pending_commands("bob", D).unwrap().is_empty());
}

#[test]
fn group_commit_takes_many_device_changes_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let hub = MemoryHub::open_with(
        dir.path(),
        StoreSettings {
            commit_interval: Duration::from_millis(50),
            ..StoreSettings::default()
        },
    )
    .unwrap();
    let c = ctx("alice", D);
    hub.add_device(&c).unwrap();
    hub.set_online(&c, online(1)).unwrap();
    hub.flush().unwrap();
    let stats = hub.stats();
    let commits = stats.store_commits.load(Ordering::Relaxed);
    let records = stats.store_records.load(Ordering::Relaxed);
    for i in 0..500u64 {
        hub.resources_changed(
            &c,
            ConnectionRef(1),
            vec![change("/a", &i.to_be_bytes(), i + 1)],
        )
        .unwrap();
    }
    hub.flush().unwrap();
    let commits = stats.store_commits.load(Ordering::Relaxed) - commits;
    let records = stats.store_records.load(Ordering::Relaxed) - records;
    // A twin record and an event per change.
    assert_eq!(records, 1000);
    assert!((1..=20).contains(&commits), "{commits} commits");
    assert_eq!(stats.store_errors.load(Ordering::Relaxed), 0);
    drop(hub);
    let hub = MemoryHub::open(dir.path()).unwrap();
    assert_eq!(hub.resource("alice", D, "/a").unwrap().version, 499);
}

#[test]
fn an_answer_is_committed_at_once_and_on_disk_when_its_issuer_learns_it() {
    let dir = tempfile::tempdir().unwrap();
    // A minute between group commits: only an urgent commit is quick.
    let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
    hub.set_connections(Arc::new(Taking::default()));
    let c = ctx("alice", D);
    hub.add_device(&c).unwrap();
    hub.publish(&c, vec![link(D, "/a")]).unwrap();
    hub.set_online(&c, online(1)).unwrap();
    let ticket = hub.submit_command("alice", command(D, "x", "/a")).unwrap();
    assert!(!ticket.pending);
    let result = CommandResult {
        correlation_id: "x".into(),
        status: Status::Ok,
        content: Content::none(),
        etag: None,
    };
    hub.command_result(&c, ConnectionRef(1), result.clone());
    assert_eq!(
        ticket.outcome.recv_timeout(Duration::from_secs(5)),
        Ok(CommandOutcome::Answered(result))
    );
    // Crash right after: the answer is on disk (a command whose answer
    // were not would come back as UNAVAILABLE).
    hub.abandon();
    let hub = MemoryHub::open(dir.path()).unwrap();
    assert!(hub.pending_commands("alice", D).unwrap().is_empty());
    let answers: Vec<Status> = hub
        .events_after("alice", 0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match &e.kind {
            EventKind::CommandAnswered { status, .. } => Some(*status),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![Status::Ok]);
}

#[test]
fn the_event_log_keeps_the_newest_events() {
    let dir = tempfile::tempdir().unwrap();
    let settings = StoreSettings {
        event_retention: 10,
        ..StoreSettings::default()
    };
    let hub = MemoryHub::open_with(dir.path(), settings).unwrap();
    let c = ctx("alice", D);
    hub.add_device(&c).unwrap();
    hub.set_online(&c, online(1)).unwrap();
    for i in 0..40u64 {
        hub.resources_changed(
            &c,
            ConnectionRef(1),
            vec![change("/a", &i.to_be_bytes(), i + 1)],
        )
        .unwrap();
    }
    hub.flush().unwrap();
    let events = hub.events_after("alice", 0, 1000).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (33..=42).collect::<Vec<u64>>());
    assert_eq!(hub.events_after("alice", 40, 1000).unwrap().len(), 2);
    assert_eq!(hub.events_after("alice", 0, 3).unwrap().len(), 3);
    drop(hub);
    // Pruning goes on after a restart (its own OFFLINE is event 43).
    let hub = MemoryHub::open_with(dir.path(), settings).unwrap();
    let seqs: Vec<u64> = hub
        .events_after("alice", 0, 1000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (34..=43).collect::<Vec<u64>>());
}

#[test]
fn a_data_dir_in_use_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _hub = MemoryHub::open(dir.path()).unwrap();
    let err = MemoryHub::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
}

#[test]
fn a_closed_store_makes_api_changes_unavailable_and_takes_a_command_back() {
    let dir = tempfile::tempdir().unwrap();
    let hub = MemoryHub::open(dir.path()).unwrap();
    let c = ctx("alice", D);
    hub.add_device(&c).unwrap();
    hub.close();
    assert!(matches!(
        hub.submit_command("alice", command(D, "late", "/a")),
        Err(HubError::Unavailable(_))
    ));
    // Not accepted: not pending either.
    assert!(hub.pending_commands("alice", D).unwrap().is_empty());
    assert!(matches!(
        hub.set_twin_enabled("alice", D, false, false),
        Err(HubError::Unavailable(_))
    ));
    // The file is free: another process (here: hub) may open it.
    let reopened = MemoryHub::open(dir.path()).unwrap();
    assert!(reopened.owns("alice", D));
    // Device-side calls go on in memory.
    hub.set_online(&c, online(1)).unwrap();
    assert!(hub.device("alice", D).unwrap().status.online);
}

/// No time-based checkpoint within a test.
fn no_checkpoints() -> StoreSettings {
    StoreSettings {
        checkpoint_interval: Duration::from_secs(3600),
        ..slow()
    }
}

/// API changes, then a crash; the redb file is put back as it was at the
/// last checkpoint (what a power loss leaves of its non-durable commits),
/// and the log is kept or not. The hub reopened on them.
fn reopened_from_the_last_checkpoint(keep_log: bool) -> (MemoryHub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let redb = dir.path().join(super::FILE_NAME);
    let c = ctx("alice", D);
    {
        let hub = MemoryHub::open_with(dir.path(), no_checkpoints()).unwrap();
        // Opening is a checkpoint.
        let at_checkpoint = std::fs::read(&redb).unwrap();
        hub.add_device(&c).unwrap();
        hub.publish(&c, vec![link(D, "/a"), link(D, "/b")]).unwrap();
        hub.set_online(&c, online(1)).unwrap();
        hub.resources_changed(&c, ConnectionRef(1), vec![change("/a", b"1", 1)])
            .unwrap();
        hub.submit_command("alice", command(D, "one", "/a"))
            .unwrap();
        hub.submit_command("alice", command(D, "two", "/b"))
            .unwrap();
        hub.cancel_command("alice", D, "one").unwrap();
        assert_eq!(hub.stats().store_checkpoints.load(Ordering::Relaxed), 0);
        hub.abandon();
        std::fs::write(&redb, at_checkpoint).unwrap();
    }
    let log = dir.path().join(super::WAL_FILE_NAME);
    assert!(std::fs::metadata(&log).unwrap().len() > 0);
    if !keep_log {
        std::fs::remove_file(&log).unwrap();
    }
    (
        MemoryHub::open_with(dir.path(), no_checkpoints()).unwrap(),
        dir,
    )
}

#[test]
fn the_write_ahead_log_holds_what_the_api_was_told_since_the_last_checkpoint() {
    let (hub, dir) = reopened_from_the_last_checkpoint(true);
    assert!(hub.owns("alice", D));
    let links = hub.links("alice", &[], &[], 0);
    assert_eq!(links[0].1.len(), 2);
    // The device change went to disk with the API calls after it.
    assert_eq!(hub.resources("alice", D).unwrap().len(), 1);
    let pending: Vec<String> = hub
        .pending_commands("alice", D)
        .unwrap()
        .into_iter()
        .map(|c| c.correlation_id)
        .collect();
    assert_eq!(pending, ["two"]);
    let names: Vec<&str> = hub
        .events_after("alice", 0, 100)
        .unwrap()
        .iter()
        .map(|e| e.kind.name())
        .collect();
    assert_eq!(
        names,
        [
            "device_registered",
            "links_published",
            "online",
            "resource_changed",
            "command_pending",
            "command_pending",
            "command_canceled",
            "offline"
        ]
    );
    // Replayed once: a second crash and reopen reads the same.
    hub.abandon();
    let hub = MemoryHub::open_with(dir.path(), no_checkpoints()).unwrap();
    assert_eq!(hub.pending_commands("alice", D).unwrap().len(), 1);
    assert_eq!(hub.events_after("alice", 0, 100).unwrap().len(), 8);
}

#[test]
fn without_the_write_ahead_log_the_changes_since_the_checkpoint_are_gone() {
    // The control of the test above: the log, not redb, held them.
    let (hub, _dir) = reopened_from_the_last_checkpoint(false);
    assert!(!hub.owns("alice", D));
    assert!(hub.events_after("alice", 0, 100).unwrap().is_empty());
}

#[test]
fn an_idle_store_checkpoints_and_redb_alone_then_holds_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let settings = StoreSettings {
        checkpoint_interval: Duration::from_millis(50),
        ..slow()
    };
    let hub = MemoryHub::open_with(dir.path(), settings).unwrap();
    let c = ctx("alice", D);
    hub.add_device(&c).unwrap();
    hub.submit_command("alice", command(D, "one", "/a"))
        .unwrap();
    let stats = hub.stats();
    let started = std::time::Instant::now();
    while stats.store_checkpoints.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no checkpoint while idle"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let redb = std::fs::read(dir.path().join(super::FILE_NAME)).unwrap();
    hub.abandon();
    std::fs::write(dir.path().join(super::FILE_NAME), redb).unwrap();
    std::fs::remove_file(dir.path().join(super::WAL_FILE_NAME)).unwrap();
    let hub = MemoryHub::open_with(dir.path(), settings).unwrap();
    assert!(hub.owns("alice", D));
    assert_eq!(hub.pending_commands("alice", D).unwrap().len(), 1);
}

// -- the token authority's refresh grants and used codes (issue 13) ---------

mod grants {
    use super::*;
    use crate::auth::grants::tests::{contract, redeem, refresh};
    use crate::auth::grants::{GrantPolicy, GrantStore};
    use crate::auth::provider::OAuthError;

    const NOW: u64 = 1_800_000_000;
    const POLICY: GrantPolicy = GrantPolicy {
        ttl: 1000,
        reuse_window: 60,
    };

    #[test]
    fn the_durable_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        contract(hub.grants());
    }

    /// A code redeemed into `r0`, `r0` refreshed into `refresh-1`, `r-d`
    /// (device D2) revoked.
    fn issue(grants: &dyn GrantStore) -> crate::auth::grants::Minted {
        redeem(grants, "code-1", "r0", D, NOW, POLICY.ttl).unwrap();
        redeem(grants, "code-2", "r-d", D2, NOW, POLICY.ttl).unwrap();
        let pair = refresh(grants, "r0", NOW + 1, POLICY, 1).unwrap();
        grants.revoke_device(D2);
        pair
    }

    /// What [`issue`] left must be there.
    fn check(grants: &dyn GrantStore, pair: &crate::auth::grants::Minted) {
        // The code stays used.
        assert!(matches!(
            redeem(grants, "code-1", "x", D, NOW + 2, POLICY.ttl),
            Err(OAuthError::Rejected(_))
        ));
        // The lost answer: the same pair again.
        assert_eq!(&refresh(grants, "r0", NOW + 3, POLICY, 2).unwrap(), pair);
        // The revoked device's grant stays revoked.
        assert!(matches!(
            refresh(grants, "r-d", NOW + 3, POLICY, 3),
            Err(OAuthError::Rejected(_))
        ));
        // The successor works.
        assert_eq!(
            refresh(grants, "refresh-1", NOW + 4, POLICY, 4)
                .unwrap()
                .refresh_token,
            "refresh-4"
        );
    }

    #[test]
    fn grants_and_used_codes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let pair = {
            let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
            let pair = issue(hub.grants().as_ref());
            hub.close();
            pair
        };
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        check(hub.grants().as_ref(), &pair);
        // And what the reopened store wrote survives too.
        hub.close();
        drop(hub);
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        // refresh-1 was rotated into refresh-4 at NOW+4: the same pair
        // within the window, refused after it.
        let grants = hub.grants();
        assert_eq!(
            refresh(grants.as_ref(), "refresh-1", NOW + 5, POLICY, 5)
                .unwrap()
                .refresh_token,
            "refresh-4"
        );
        assert!(matches!(
            refresh(grants.as_ref(), "refresh-1", NOW + 4 + 61, POLICY, 5),
            Err(OAuthError::Rejected(_))
        ));
        assert!(refresh(grants.as_ref(), "refresh-4", NOW + 70, POLICY, 6).is_ok());
    }

    /// Grants written after the last checkpoint, then a crash that leaves
    /// redb as it was at the checkpoint; reopened with the log or without.
    fn after_a_crash(
        keep_log: bool,
    ) -> (MemoryHub, crate::auth::grants::Minted, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let redb = dir.path().join(super::super::FILE_NAME);
        let pair = {
            let hub = MemoryHub::open_with(dir.path(), no_checkpoints()).unwrap();
            let at_checkpoint = std::fs::read(&redb).unwrap();
            let pair = issue(hub.grants().as_ref());
            // The revocation is not awaited: make sure it is in the log.
            hub.flush().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(hub.stats().store_checkpoints.load(Ordering::Relaxed), 0);
            hub.abandon();
            std::fs::write(&redb, at_checkpoint).unwrap();
            pair
        };
        if !keep_log {
            std::fs::remove_file(dir.path().join(super::super::WAL_FILE_NAME)).unwrap();
        }
        let hub = MemoryHub::open_with(dir.path(), no_checkpoints()).unwrap();
        (hub, pair, dir)
    }

    #[test]
    fn grants_and_used_codes_are_replayed_from_the_write_ahead_log() {
        let (hub, pair, _dir) = after_a_crash(true);
        check(hub.grants().as_ref(), &pair);
    }

    #[test]
    fn without_the_log_the_grants_since_the_checkpoint_are_gone() {
        // The control of the test above.
        let (hub, _pair, _dir) = after_a_crash(false);
        assert!(matches!(
            refresh(hub.grants().as_ref(), "r0", NOW + 3, POLICY, 2),
            Err(OAuthError::Rejected(_))
        ));
    }

    #[test]
    fn prune_drops_expired_grants_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        let grants = hub.grants();
        redeem(grants.as_ref(), "c", "t", D, NOW, 100).unwrap();
        grants.prune(NOW + 50);
        hub.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Still there: the successor of a refresh at NOW+60.
        let fresh = refresh(grants.as_ref(), "t", NOW + 60, POLICY, 1).unwrap();
        grants.prune(NOW + 60 + POLICY.ttl + 1);
        std::thread::sleep(Duration::from_millis(200));
        hub.close();
        drop(hub);
        let hub = MemoryHub::open_with(dir.path(), slow()).unwrap();
        assert!(matches!(
            refresh(
                hub.grants().as_ref(),
                &fresh.refresh_token,
                NOW + 61,
                POLICY,
                2
            ),
            Err(OAuthError::Rejected(_))
        ));
    }
}
