//! Root tests: fsfreeze, FrozenSet, the watchdog and recovery, on loop-mounted file systems of
//! the tests' own (never `/` nor a host mount). Skipped when not root, failing instead when
//! BULWARK_REQUIRE_ROOT_TESTS=1.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulwark_consistency::FreezeObserved;
use bulwark_quiesce::freeze::{self, FrozenSet};
use bulwark_quiesce::watchdog::{FrozenState, read_frozen_state, write_frozen_state};
use bulwark_quiesce::{Error, FreezeOptions, WatchedFreeze, recover_frozen_state};
use bulwark_tests::{FsType, root_or_skip};
use common::{Writer, assert_frozen, assert_writable, loop_fs, loop_fs_sized};

const SECS: Duration = Duration::from_secs(10);

#[test]
fn freeze_blocks_writers_until_thaw() {
    if !root_or_skip("freeze_blocks_writers_until_thaw", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    assert_writable(fs.path(), "before");
    let mut set = FrozenSet::freeze_all(&[fs.path()]).unwrap();
    assert!(set.is_frozen());
    let mut w = assert_frozen(fs.path(), "during");
    let report = set.thaw();
    assert_eq!(report.thawed, [fs.path().to_path_buf()]);
    assert!(report.is_clean() && report.thawed_by_someone_else.is_empty());
    assert!(
        w.finishes_within(SECS),
        "the blocked write did not proceed after the thaw"
    );
    assert!(!set.is_frozen());
}

#[test]
fn freezing_twice_is_handled() {
    if !root_or_skip("freezing_twice_is_handled", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let sub = fs.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    // The same file system named three ways is frozen once.
    let mut set = FrozenSet::new(&[
        fs.path().to_path_buf(),
        sub.clone(),
        fs.path().to_path_buf(),
    ])
    .unwrap();
    assert_eq!(set.mounts().len(), 1);
    set.freeze().unwrap();
    set.freeze().unwrap(); // idempotent
    // Someone else (another set) freezing it: EBUSY, reported as AlreadyFrozen.
    let err = FrozenSet::freeze_all(&[fs.path()]).unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyFrozen { mount } if mount == fs.path()),
        "{err}"
    );
    assert!(matches!(
        freeze::freeze(fs.path()),
        Err(Error::AlreadyFrozen { .. })
    ));
    // ... and the failed attempts did not thaw what is ours.
    let mut w = assert_frozen(fs.path(), "still-frozen");
    assert_eq!(set.thaw().thawed.len(), 1);
    assert!(w.finishes_within(SECS));
    // Thawing again does nothing; thawing a file system that is not frozen is Ok(false).
    assert_eq!(set.thaw(), Default::default());
    assert!(!freeze::thaw(fs.path()).unwrap());
}

#[test]
fn dropping_the_set_thaws() {
    if !root_or_skip("dropping_the_set_thaws", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let mut w = {
        let _set = FrozenSet::freeze_all(&[fs.path()]).unwrap();
        assert_frozen(fs.path(), "during")
    };
    assert!(w.finishes_within(SECS));
}

#[test]
fn nested_mounts_freeze_children_first() {
    if !root_or_skip(
        "nested_mounts_freeze_children_first",
        &["mkfs.ext4", "mkfs.xfs"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outer = loop_fs_sized(dir.path(), "outer", FsType::Ext4, 1 << 30);
    let inner = loop_fs(outer.path(), "inner", FsType::XfsReflink); // dropped first
    let mut set = FrozenSet::freeze_all(&[outer.path(), inner.path()]).unwrap();
    assert_eq!(
        set.mounts(),
        [inner.path().to_path_buf(), outer.path().to_path_buf()]
    );
    let mut w1 = assert_frozen(outer.path(), "o");
    let mut w2 = assert_frozen(inner.path(), "i");
    let report = set.thaw();
    // Thawed in the opposite order: the parent first.
    assert_eq!(
        report.thawed,
        [outer.path().to_path_buf(), inner.path().to_path_buf()]
    );
    assert!(w1.finishes_within(SECS) && w2.finishes_within(SECS));

    // Never freeze `outer` on its own while `inner` may still be frozen later: inner's image
    // lives on outer, so freezing inner would wait forever for outer (this is why children
    // freeze first).
}

#[test]
fn a_failed_freeze_leaves_nothing_frozen() {
    if !root_or_skip("a_failed_freeze_leaves_nothing_frozen", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Siblings (neither backs the other), frozen in the order given: a, then b.
    let a = loop_fs(dir.path(), "a", FsType::Ext4);
    let b = loop_fs(dir.path(), "b", FsType::Ext4);
    freeze::freeze(b.path()).unwrap(); // someone else's freeze
    let mut set = FrozenSet::new(&[a.path(), b.path()]).unwrap();
    assert_eq!(
        set.mounts(),
        [a.path().to_path_buf(), b.path().to_path_buf()]
    );
    let err = set.freeze().unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyFrozen { mount } if mount == b.path()),
        "{err}"
    );
    // a was frozen, then thawed again by the failed freeze.
    assert!(!set.is_frozen());
    assert_writable(a.path(), "a1");
    // b is someone else's: left frozen for them.
    let mut w = assert_frozen(b.path(), "b1");
    assert!(freeze::thaw(b.path()).unwrap());
    assert!(w.finishes_within(SECS));
}

#[test]
fn btrfs_freezes_too() {
    if !root_or_skip("btrfs_freezes_too", &["mkfs.btrfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Btrfs);
    let mut set = FrozenSet::freeze_all(&[fs.path()]).unwrap();
    let mut w = assert_frozen(fs.path(), "b");
    assert!(set.thaw().is_clean());
    assert!(w.finishes_within(SECS));
}

#[test]
fn watchdog_thaws_at_the_deadline() {
    if !root_or_skip("watchdog_thaws_at_the_deadline", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let state = dir.path().join("frozen.json");
    let started = Instant::now();
    let mut wf = WatchedFreeze::start(
        &[fs.path()],
        FreezeOptions::new(Duration::from_millis(1500)).state_file(&state),
    )
    .unwrap();
    let st = read_frozen_state(&state).unwrap().unwrap();
    assert_eq!(st.mounts, [fs.path().to_path_buf()]);
    assert_eq!(st.pid, std::process::id());
    assert!(st.deadline_unix_ms >= st.written_unix_ms + 1400);
    let mut w = assert_frozen(fs.path(), "w");
    // Nobody calls thaw: the watchdog does, at the deadline.
    assert!(w.finishes_within(SECS));
    let at = started.elapsed();
    assert!(
        at >= Duration::from_millis(1400),
        "thawed too early: {at:?}"
    );
    assert!(wf.watchdog_fired());
    assert!(
        !state.exists(),
        "the watchdog leaves no state file after a clean thaw"
    );
    let report = wf.thaw();
    assert!(!report.held_continuously);
    assert!(report.watchdog_fired);
    assert_eq!(report.thaw.thawed, [fs.path().to_path_buf()]);
    assert!(
        report.reasons[0].contains("watchdog thawed at the 1.5s deadline"),
        "{:?}",
        report.reasons
    );
    assert!(matches!(
        report.observed(),
        FreezeObserved::NotHeldContinuously { .. }
    ));
    assert!(
        report.frozen_for < Duration::from_millis(3000),
        "{:?}",
        report.frozen_for
    );
    // Idempotent.
    assert_eq!(wf.thaw(), report);
}

#[test]
fn a_thaw_before_the_deadline_is_held_continuously() {
    if !root_or_skip(
        "a_thaw_before_the_deadline_is_held_continuously",
        &["mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let state = dir.path().join("frozen.json");
    let mut wf = WatchedFreeze::start(
        &[fs.path()],
        FreezeOptions::new(Duration::from_secs(60)).state_file(&state),
    )
    .unwrap();
    assert!(state.exists());
    let mut w = assert_frozen(fs.path(), "w");
    let report = wf.thaw();
    assert!(report.held_continuously, "{report:?}");
    assert_eq!(report.observed(), FreezeObserved::Held);
    assert!(!report.watchdog_fired);
    assert!(w.finishes_within(SECS));
    assert!(!state.exists());
    assert!(!wf.watchdog_fired());
    assert_eq!(wf.thaw(), report);
}

#[test]
fn a_thaw_by_someone_else_is_not_held_continuously() {
    if !root_or_skip(
        "a_thaw_by_someone_else_is_not_held_continuously",
        &["mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let mut wf =
        WatchedFreeze::start(&[fs.path()], FreezeOptions::new(Duration::from_secs(60))).unwrap();
    assert!(freeze::thaw(fs.path()).unwrap()); // an admin's `fsfreeze -u`
    let report = wf.thaw();
    assert!(!report.held_continuously);
    assert_eq!(
        report.thaw.thawed_by_someone_else,
        [fs.path().to_path_buf()]
    );
    assert!(
        report.reasons[0].contains("thawed by someone else"),
        "{:?}",
        report.reasons
    );
}

#[test]
fn dropping_a_watched_freeze_thaws() {
    if !root_or_skip("dropping_a_watched_freeze_thaws", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let mut w = {
        let _wf = WatchedFreeze::start(&[fs.path()], FreezeOptions::new(Duration::from_secs(60)))
            .unwrap();
        assert_frozen(fs.path(), "w")
    };
    assert!(w.finishes_within(SECS));
}

#[test]
fn a_watched_freeze_that_cannot_write_its_state_freezes_nothing() {
    if !root_or_skip(
        "a_watched_freeze_that_cannot_write_its_state",
        &["mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    let bad = dir.path().join("no/such/dir/state.json");
    let err = WatchedFreeze::start(
        &[fs.path()],
        FreezeOptions::new(Duration::from_secs(60)).state_file(&bad),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_writable(fs.path(), "w");
    assert!(matches!(
        WatchedFreeze::start(&[fs.path()], FreezeOptions::new(Duration::ZERO)),
        Err(Error::BadTimeout { .. })
    ));
    assert!(
        WatchedFreeze::start(&[fs.path()], FreezeOptions::new(Duration::from_secs(3600))).is_err()
    );
    assert_writable(fs.path(), "w2");
}

#[test]
fn recover_frozen_state_thaws_what_a_dead_agent_left() {
    if !root_or_skip(
        "recover_frozen_state_thaws_what_a_dead_agent_left",
        &["mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = loop_fs(dir.path(), "a", FsType::Ext4);
    let b = loop_fs(dir.path(), "b", FsType::Ext4);
    let state = dir.path().join("frozen.json");
    assert!(recover_frozen_state(&state).unwrap().is_none());
    // An "agent" wrote its state and froze a, then vanished (no guard left to thaw).
    let gone = dir.path().join("unmounted-since");
    write_frozen_state(
        &state,
        &FrozenState::new(
            vec![a.path().to_path_buf(), b.path().to_path_buf(), gone.clone()],
            Duration::from_secs(30),
        ),
    )
    .unwrap();
    freeze::freeze(a.path()).unwrap();
    let mut w = assert_frozen(a.path(), "w");
    let report = recover_frozen_state(&state).unwrap().unwrap();
    assert_eq!(report.thawed, [a.path().to_path_buf()]);
    assert_eq!(report.not_frozen, [gone, b.path().to_path_buf()]);
    assert!(report.failed.is_empty());
    assert!(w.finishes_within(SECS));
    assert!(!state.exists());
    // A malformed state file is an error naming it, and is kept.
    std::fs::write(&state, "{not json").unwrap();
    assert!(matches!(
        recover_frozen_state(&state),
        Err(Error::StateFile { .. })
    ));
    assert!(state.exists());
}

#[test]
fn discovery_sees_a_loop_mount_and_honours_the_skip_list() {
    if !root_or_skip("discovery_sees_a_loop_mount", &["mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = loop_fs(dir.path(), "fs", FsType::Ext4);
    // Discovery only: nothing is frozen here.
    let found = bulwark_quiesce::mounts::discover_freezable(&[]).unwrap();
    let canon = std::fs::canonicalize(fs.path()).unwrap();
    assert!(
        found.contains(&canon),
        "{found:?} lacks {}",
        canon.display()
    );
    let found = bulwark_quiesce::mounts::discover_freezable(std::slice::from_ref(&canon)).unwrap();
    assert!(!found.contains(&canon));
    let _: Vec<PathBuf> = found;
}

#[test]
fn the_writer_helper_really_detects_freezes() {
    // Guards the other tests against passing vacuously: a write to an unfrozen fs finishes.
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::start(dir.path(), "x");
    assert!(w.finishes_within(SECS));
}
