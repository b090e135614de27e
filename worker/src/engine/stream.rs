//! Streaming input: an epoch read batch by batch, a few batches ahead of the step, never whole.
//!
//! A [`SlotReader`] gives one slot of this rank's epoch (its unorm16 pixels, as the decode cache stores
//! them, and its sample id). [`StreamedEpoch`] reads the slots of the coming batches on its own thread
//! (each batch's images in parallel) into a bounded queue of `depth` batches, so a rank holds at most
//! `depth + 2` batches of pixels (the queue, the one being read and the one being trained on) whatever
//! the epoch's length. A batch leaves the queue as a u16 tensor in pinned memory on CUDA (reinterpreted
//! as int16, which libtorch can hold), is copied to the device without blocking and becomes float32 in
//! [0, 1] there: the same values as `u16 as f32 / 65535` on the host.
//!
//! A slot that cannot be read is reported once per epoch and filled with the next slot of the epoch
//! that can (wrapping), with views of its own (see [`SlotReader::substitute_id`]), so every rank keeps
//! the same number of steps.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::engine::train::{EpochSource, TrainError};

/// One epoch's slots on this rank, in step order.
pub trait SlotReader: Send + Sync + 'static {
    /// Slots in the epoch.
    fn slots(&self) -> usize;
    /// Side of the (square) images.
    fn side(&self) -> usize;
    /// Images per slot: 1, or 2 when a sample's second view comes from an image of its own (the
    /// first image's pixels, then the second's).
    fn channels(&self) -> usize {
        1
    }
    /// Slot `slot`'s pixels, `channels` x `side`^2 unorm16 values, or why they cannot be had.
    fn read(&self, slot: usize) -> Result<Vec<u16>, String>;
    /// The sample id of slot `slot`'s image (what its views derive from).
    fn id(&self, slot: usize) -> u64;
    /// The sample id of slot `slot` filled with the image of slot `source`: differs from every id of
    /// the epoch, so the substitute's views are not copies of the source's.
    fn substitute_id(&self, slot: usize, source: usize) -> u64;
    /// Slot `slot` could not be read (told once per slot and epoch).
    fn report(&self, slot: usize, reason: &str);
}

/// A batch read ahead: its pixels (u16 as i16, b x channels x side x side) and sample ids.
type Batch = Result<(Tensor, Vec<u64>), TrainError>;

/// An epoch read from a [`SlotReader`] in batches of `batch` slots, `depth` batches ahead.
pub struct StreamedEpoch {
    reader: Arc<dyn SlotReader>,
    batch: usize,
    depth: usize,
    device: Device,
    /// The reading thread, its queue and the position of the next batch it will deliver.
    ahead: Option<(Receiver<Batch>, JoinHandle<()>, usize)>,
}

impl StreamedEpoch {
    pub fn new(reader: Arc<dyn SlotReader>, batch: usize, depth: usize, device: Device) -> StreamedEpoch {
        StreamedEpoch { reader, batch: batch.max(1), depth: depth.max(1), device, ahead: None }
    }

    /// Starts reading at batch `position` (dropping any reading ahead from elsewhere).
    fn start(&mut self, position: usize) {
        self.stop();
        let (tx, rx) = sync_channel(self.depth);
        let (reader, batch, pin) = (Arc::clone(&self.reader), self.batch, self.device.is_cuda());
        let handle = std::thread::Builder::new()
            .name("batch-reader".into())
            .spawn(move || {
                let batches = reader.slots() / batch;
                for p in position..batches {
                    let b = read_batch(&*reader, p * batch, batch, pin);
                    let failed = b.is_err();
                    // The receiver is gone: the epoch was dropped or restarted elsewhere.
                    if tx.send(b).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the batch reader");
        self.ahead = Some((rx, handle, position));
    }

    fn stop(&mut self) {
        if let Some((rx, handle, _)) = self.ahead.take() {
            drop(rx);
            let _ = handle.join();
        }
    }
}

impl Drop for StreamedEpoch {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EpochSource for StreamedEpoch {
    fn slots(&self) -> usize {
        self.reader.slots()
    }

    fn batch(&mut self, position: usize, size: usize) -> Result<(Tensor, Vec<u64>), TrainError> {
        if size != self.batch {
            return Err(TrainError::Config(format!(
                "batches of {size} asked of an epoch read in batches of {}",
                self.batch
            )));
        }
        if !matches!(&self.ahead, Some((_, _, next)) if *next == position) {
            self.start(position);
        }
        let (rx, _, next) = self.ahead.as_mut().expect("started above");
        let received = rx.recv().map_err(|_| TrainError::Data {
            message: format!("the batch reader stopped before batch {position}"),
            retryable: true,
        })?;
        *next += 1;
        let (pixels, ids) = received?;
        Ok((unorm16_to_float(&pixels, self.device), ids))
    }
}

/// Slots [start, start + size) with failed slots filled from the next slot that reads, as a u16-as-i16
/// tensor (pinned when `pin`).
fn read_batch(reader: &dyn SlotReader, start: usize, size: usize, pin: bool) -> Batch {
    let side = reader.side();
    let channels = reader.channels();
    let read: Vec<Result<Vec<u16>, String>> = (start..start + size).into_par_iter().map(|s| reader.read(s)).collect();
    let mut pixels: Vec<i16> = Vec::with_capacity(size * channels * side * side);
    let mut ids = Vec::with_capacity(size);
    for (k, r) in read.into_iter().enumerate() {
        let slot = start + k;
        let (values, id) = match r {
            Ok(values) => (values, reader.id(slot)),
            Err(reason) => {
                reader.report(slot, &reason);
                let (source, values) = substitute(reader, slot)?;
                (values, reader.substitute_id(slot, source))
            }
        };
        if values.len() != channels * side * side {
            return Err(TrainError::Data {
                message: format!("slot {slot}: {} pixels, expected {channels}x{side}x{side}", values.len()),
                retryable: false,
            });
        }
        pixels.extend(values.into_iter().map(|v| v as i16));
        ids.push(id);
    }
    let tensor = Tensor::from_slice(&pixels).view([size as i64, channels as i64, side as i64, side as i64]);
    let tensor = if pin { tensor.pin_memory(Device::Cuda(0)) } else { tensor };
    Ok((tensor, ids))
}

/// The first slot after `slot` (wrapping) whose image reads, and its pixels.
fn substitute(reader: &dyn SlotReader, slot: usize) -> Result<(usize, Vec<u16>), TrainError> {
    let n = reader.slots();
    (1..n).map(|d| (slot + d) % n).find_map(|s| reader.read(s).ok().map(|v| (s, v))).ok_or_else(|| TrainError::Data {
        message: format!("none of this rank's {n} images of the epoch can be read"),
        retryable: false,
    })
}

/// u16 values held as int16 to float32 in [0, 1] on `device` (copied there without blocking).
pub fn unorm16_to_float(pixels: &Tensor, device: Device) -> Tensor {
    let on_device =
        if device.is_cuda() { pixels.to_device_(device, Kind::Int16, true, false) } else { pixels.shallow_clone() };
    on_device.to_kind(Kind::Int).bitwise_and(0xFFFF).to_kind(Kind::Float) / 65535.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::train::EpochData;
    use std::sync::Mutex;

    /// Slots whose pixels derive from their index; the slots in `bad` cannot be read.
    struct Synthetic {
        slots: usize,
        side: usize,
        bad: Vec<usize>,
        reported: Mutex<Vec<usize>>,
    }

    impl SlotReader for Synthetic {
        fn slots(&self) -> usize {
            self.slots
        }
        fn side(&self) -> usize {
            self.side
        }
        fn read(&self, slot: usize) -> Result<Vec<u16>, String> {
            if self.bad.contains(&slot) {
                return Err(format!("slot {slot} is corrupt"));
            }
            Ok((0..self.side * self.side).map(|i| ((slot * 7919 + i * 131) % 65536) as u16).collect())
        }
        fn id(&self, slot: usize) -> u64 {
            slot as u64
        }
        fn substitute_id(&self, slot: usize, source: usize) -> u64 {
            1_000_000 + (slot * 1000 + source) as u64
        }
        fn report(&self, slot: usize, _reason: &str) {
            self.reported.lock().unwrap().push(slot);
        }
    }

    fn synthetic(slots: usize, bad: Vec<usize>) -> Arc<Synthetic> {
        Arc::new(Synthetic { slots, side: 4, bad, reported: Mutex::new(Vec::new()) })
    }

    /// The whole epoch as the host would hold it: u16 / 65535 in float32, with the same substitutions.
    fn held_whole(r: &Synthetic) -> EpochData {
        let mut pixels = Vec::new();
        let mut ids = Vec::new();
        for slot in 0..r.slots {
            let (source, id) = match r.read(slot) {
                Ok(_) => (slot, slot as u64),
                Err(_) => {
                    let s = (1..r.slots).map(|d| (slot + d) % r.slots).find(|s| !r.bad.contains(s)).unwrap();
                    (s, r.substitute_id(slot, s))
                }
            };
            pixels.extend(r.read(source).unwrap().into_iter().map(|v| f32::from(v) / 65535.0));
            ids.push(id);
        }
        let images = Tensor::from_slice(&pixels).view([r.slots as i64, 1, 4, 4]);
        EpochData { images, ids }
    }

    #[test]
    fn a_streamed_epoch_gives_the_batches_of_the_epoch_held_whole() {
        let reader = synthetic(24, vec![5, 6, 23]);
        let mut whole = held_whole(&reader);
        let mut streamed = StreamedEpoch::new(reader.clone(), 4, 2, Device::Cpu);
        assert_eq!(streamed.slots(), 24);
        // In order, then out of order (a resumed run starts mid-epoch), then in order again.
        for position in [0, 1, 2, 3, 4, 5, 2, 3, 0] {
            let (a, ids_a) = streamed.batch(position, 4).unwrap();
            let (b, ids_b) = whole.batch(position, 4).unwrap();
            assert_eq!(a.kind(), Kind::Float);
            assert!(a.equal(&b), "batch {position} differs");
            assert_eq!(ids_a, ids_b, "batch {position}");
        }
        // Slot 23 wraps around to slot 0; slots 5 and 6 take slot 7.
        assert_eq!(whole.ids[5], 1_005_007);
        assert_eq!(whole.ids[23], 1_023_000);
        let mut reported = reader.reported.lock().unwrap().clone();
        reported.sort();
        reported.dedup();
        assert_eq!(reported, vec![5, 6, 23]);
    }

    #[test]
    fn an_epoch_where_nothing_reads_is_an_error_not_a_hang() {
        let reader = synthetic(8, (0..8).collect());
        let mut streamed = StreamedEpoch::new(reader, 4, 2, Device::Cpu);
        let e = streamed.batch(0, 4).unwrap_err().to_string();
        assert!(e.contains("none of this rank's 8 images"), "{e}");
        assert!(streamed.batch(5, 4).is_err(), "past the last batch");
    }

    #[test]
    fn unorm16_values_become_the_floats_the_host_would_compute() {
        let values: Vec<u16> = vec![0, 1, 2, 255, 32767, 32768, 40000, 65534, 65535];
        let t = Tensor::from_slice(&values.iter().map(|&v| v as i16).collect::<Vec<_>>());
        let got = Vec::<f32>::try_from(unorm16_to_float(&t, Device::Cpu)).unwrap();
        let want: Vec<f32> = values.iter().map(|&v| f32::from(v) / 65535.0).collect();
        assert_eq!(got, want);
    }
}
