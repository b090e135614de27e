//! Inputs the fuzz target (data/fuzz, scripts/fuzz_decode.sh) found, kept as regression tests: each must
//! give an error, not a panic, and must not make the process allocate what it declares. A counting
//! allocator records the largest single allocation and the peak of live bytes while each input is
//! decoded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use simclr_data::pixels::{decode_bytes, decode_file};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Far above what a file of a few KB may need, far below the gigabytes its fields declare.
const MAX_ALLOCATION: usize = 64 << 20;
const MAX_LIVE: usize = 256 << 20;

// One test, so that no other test's allocations run while one input is measured.
#[test]
fn fuzz_findings_are_errors_without_huge_allocations() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no inputs in {}", dir.display());
    for path in inputs {
        let bytes = std::fs::read(&path).unwrap();
        LARGEST.store(0, Ordering::Relaxed);
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let before = LIVE.load(Ordering::Relaxed);
        let from_bytes = decode_bytes(&bytes);
        let from_file = decode_file(&path);
        let largest = LARGEST.load(Ordering::Relaxed);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        assert!(from_bytes.is_err() && from_file.is_err(), "{}: decoded, expected an error", path.display());
        assert!(largest < MAX_ALLOCATION, "{}: allocated {largest} bytes at once", path.display());
        assert!(peak < MAX_LIVE, "{}: {peak} bytes live at the peak", path.display());
        println!("{}: {} (largest allocation {largest} B, peak {peak} B)", path.display(), from_bytes.unwrap_err());
    }
}
