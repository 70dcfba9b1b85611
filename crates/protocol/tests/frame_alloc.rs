//! An oversized length prefix is rejected *before* the payload buffer is allocated: a counting
//! global allocator records the largest allocation made while `read_frame` runs.
//!
//! The tests of this file take `SERIAL` so that no other test allocates while one records.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure report

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bulwark_protocol::{Error, MAX_FRAME_LEN, read_frame};
use proptest::prelude::*;

struct Counting;

static RECORDING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: delegates every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if RECORDING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if RECORDING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if RECORDING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Header of the announced length followed by an endless supply of bytes, so that a reader
/// that did allocate and read would succeed (and be caught by the allocation record).
fn input(len: u32) -> impl tokio::io::AsyncRead + Unpin {
    tokio::io::AsyncReadExt::chain(
        std::io::Cursor::new(len.to_be_bytes()),
        tokio::io::repeat(0),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn oversized_length_rejected_before_allocation(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut reader = input(len);
        LARGEST.store(0, Ordering::Relaxed);
        RECORDING.store(true, Ordering::Relaxed);
        let result = rt.block_on(read_frame(&mut reader, "t"));
        RECORDING.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        let rejected = matches!(result, Err(Error::FrameTooLarge { len: l, .. }) if l == u64::from(len));
        prop_assert!(rejected, "{result:?}");
        prop_assert!(largest < MAX_FRAME_LEN, "allocated {largest} bytes for a {len}-byte frame");
    }
}

#[test]
fn control_a_frame_at_the_limit_is_allocated_and_seen() {
    // Proves the allocator record works: a frame of exactly the limit is read and its buffer
    // shows up.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut reader = input(MAX_FRAME_LEN as u32);
    LARGEST.store(0, Ordering::Relaxed);
    RECORDING.store(true, Ordering::Relaxed);
    let result = rt.block_on(read_frame(&mut reader, "t"));
    RECORDING.store(false, Ordering::Relaxed);
    assert_eq!(result.unwrap().map(|p| p.len()), Some(MAX_FRAME_LEN));
    assert!(LARGEST.load(Ordering::Relaxed) >= MAX_FRAME_LEN);
}
