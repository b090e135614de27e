//! The streaming loader's memory does not grow with the epoch: the process's peak resident memory over
//! a pass through an epoch of 20,000 images (Linux's VmHWM, reset before each pass) grows by no more
//! than over an epoch of 1,000, a small fraction of the larger epoch's pixels. The libtorch tensors
//! of the queue are counted too. A loader that read the whole epoch, or one whose queue had no bound,
//! fails it.

use std::sync::Arc;
use std::time::Duration;

use simclr_worker::engine::stream::{SlotReader, StreamedEpoch};
use simclr_worker::engine::train::EpochSource;
use tch::Device;

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

const SIDE: usize = 64;
const BATCH: usize = 32;

/// Slots whose pixels are computed when read (nothing per slot is held).
struct Generated(usize);

impl SlotReader for Generated {
    fn slots(&self) -> usize {
        self.0
    }
    fn side(&self) -> usize {
        SIDE
    }
    fn read(&self, slot: usize) -> Result<Vec<u16>, String> {
        Ok((0..SIDE * SIDE).map(|i| (slot.wrapping_mul(40_503) ^ i) as u16).collect())
    }
    fn id(&self, slot: usize) -> u64 {
        slot as u64
    }
    fn substitute_id(&self, slot: usize, _source: usize) -> u64 {
        u64::MAX - slot as u64
    }
    fn report(&self, _slot: usize, _reason: &str) {}
}

/// The most resident bytes above those at the start, over one pass through an epoch of `slots`
/// images; the reader is given time to run ahead of the step twice.
fn peak_over_epoch(slots: usize) -> usize {
    let mut epoch = StreamedEpoch::new(Arc::new(Generated(slots)), BATCH, 3, Device::Cpu);
    // Resets VmHWM to the current resident size (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident size");
    let base = status_bytes("VmRSS:");
    let batches = slots / BATCH;
    let mut rows = 0;
    for position in 0..batches {
        if position == 0 || position == batches / 2 {
            std::thread::sleep(Duration::from_millis(800));
        }
        let (images, ids) = epoch.batch(position, BATCH).unwrap();
        assert_eq!(ids[0], (position * BATCH) as u64);
        rows += images.size()[0] as usize;
    }
    assert_eq!(rows, batches * BATCH);
    drop(epoch);
    status_bytes("VmHWM:").saturating_sub(base)
}

#[test]
fn an_epoch_of_20000_images_holds_no_more_memory_than_one_of_1000() {
    // rayon's pool and libtorch's first tensors allocate once: not the loader's.
    let _ = peak_over_epoch(4 * BATCH);
    let small = peak_over_epoch(1_000);
    let large = peak_over_epoch(20_000);
    let image = SIDE * SIDE * 2;
    let large_epoch = 20_000 * image;
    let batch = BATCH * image;
    eprintln!(
        "peak resident growth: 1,000 images {small} B, 20,000 images {large} B ({:.1} batches of u16 pixels; \
         the large epoch's pixels are {large_epoch} B)",
        large as f64 / batch as f64
    );
    // A float32 batch is 2 u16 batches; the queue (3), the batch being read, the one handed over and
    // the allocator's slack stay well under 32 u16 batches (8 MB, 5% of the large epoch).
    assert!(large < 32 * batch, "{large} B more resident over 20,000 images: more than 32 batches of {batch} B");
    assert!(large <= small + 16 * batch, "20,000 images: {large} B more resident, 1,000: {small} B");
}
