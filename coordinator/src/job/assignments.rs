//! Which images each rank reads: its slots of every epoch's global order (the same order for any world
//! size) and its share of the validation and test images, or the labelled images of the probe sweep.

use simclr_data::dataset::{epoch_order, rank_slots, Slot};

use super::*;

impl Job {
    /// `rank`'s images for `epoch`: its slice of every global batch of the epoch's order (from the
    /// job's seed and the epoch alone) and every world-size-th labelled validation and test image.
    /// With `probe`, every world-size-th labelled training image instead of the slots.
    pub fn assignment(
        &self,
        rank: u32,
        instance_id: &str,
        epoch: u64,
        probe: bool,
    ) -> Result<wire::GetAssignmentResponse, Status> {
        let world_size = {
            let state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            state.members.len()
        };
        let Some(data) = &self.data else { return Ok(wire::GetAssignmentResponse::default()) };
        let d = &data.dataset;
        let image_ref = |(i, occurrence): Slot| {
            let img = &d.index.images[i];
            let study = data.study_of[i];
            let labels = d
                .studies
                .get(study)
                .and_then(|s| s.labels.as_ref())
                .map(|values| data.targets.iter().map(|&t| values[t]).collect())
                .unwrap_or_default();
            wire::ImageRef {
                path: img.path.display().to_string(),
                sop_uid: img.sop_uid.clone(),
                file_size: img.file_size,
                modified_ns: u64::try_from(img.modified_ns).unwrap_or(u64::MAX),
                labels,
                index: i as u64,
                study: study as u64,
                group: data.groups.get(study).copied().unwrap_or(study) as u64,
                occurrence,
            }
        };
        let labelled_images_of = |studies: &[usize]| {
            let mut images: Vec<usize> = studies
                .iter()
                .map(|&i| &d.studies[i])
                .filter(|s| s.labels.is_some())
                .flat_map(|s| s.images.iter().copied())
                .collect();
            images.sort_unstable();
            images
        };
        let mine = |images: Vec<usize>| -> Vec<wire::ImageRef> {
            images.into_iter().skip(rank as usize).step_by(world_size).map(|i| image_ref((i, 0))).collect()
        };
        let train = if probe {
            mine(labelled_images_of(&data.split.train))
        } else {
            let batch = self.config.pretrain.batch_size;
            if !batch.is_multiple_of(world_size) {
                return Err(Status::failed_precondition(format!(
                    "pretrain.batch_size {batch} is not a multiple of the world size {world_size}"
                )));
            }
            let order =
                epoch_order(&data.training_images, batch, self.config.job.seed, epoch, self.config.data.shard_policy)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
            rank_slots(&order, batch, world_size, rank as usize).into_iter().map(image_ref).collect()
        };
        Ok(wire::GetAssignmentResponse {
            data_root: data.root.display().to_string(),
            image_size: self.config.image_size(),
            train,
            test: mine(labelled_images_of(&data.split.test)),
            validation: mine(labelled_images_of(&data.split.validation)),
            label_columns: data.targets.iter().map(|&t| d.label_columns[t].clone()).collect(),
        })
    }
}
