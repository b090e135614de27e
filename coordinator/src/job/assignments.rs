//! Which images each rank reads: its shard of every epoch's global order and its share of the test
//! images, or the labelled images of the probe sweep.

use super::*;

impl Job {
    /// `rank`'s images for `epoch`: its shard of the training studies (the same shards every process
    /// would compute from the seed and epoch) and every world-size-th test image. With `probe`, every
    /// world-size-th labelled training image instead of the shard (no image left out to even the
    /// shards), and only labelled test images.
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
        let mut study_of = vec![usize::MAX; d.index.images.len()];
        for (s, study) in d.studies.iter().enumerate() {
            for &i in &study.images {
                study_of[i] = s;
            }
        }
        let image_ref = |i: usize| {
            let img = &d.index.images[i];
            let labels = d
                .studies
                .get(study_of[i])
                .and_then(|s| s.labels.as_ref())
                .map(|values| data.targets.iter().map(|&t| values[t]).collect())
                .unwrap_or_default();
            wire::ImageRef {
                path: img.path.display().to_string(),
                sop_uid: img.sop_uid.clone(),
                file_size: img.file_size,
                modified_ns: u64::try_from(img.modified_ns).unwrap_or(u64::MAX),
                labels,
            }
        };
        let images_of = |studies: &[usize]| {
            let mut images: Vec<usize> = studies
                .iter()
                .map(|&i| &d.studies[i])
                .filter(|s| !probe || s.labels.is_some())
                .flat_map(|s| s.images.iter().copied())
                .collect();
            images.sort_unstable();
            images
        };
        let mine = |images: Vec<usize>| -> Vec<wire::ImageRef> {
            images.into_iter().skip(rank as usize).step_by(world_size).map(image_ref).collect()
        };
        let train = if probe {
            mine(images_of(&data.split.train))
        } else {
            let train_studies: Vec<_> = data.split.train.iter().map(|&i| &d.studies[i]).collect();
            let shards =
                epoch_shards(&train_studies, world_size, self.config.job.seed, epoch, self.config.data.shard_policy)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
            shards[rank as usize].iter().map(|&i| image_ref(i)).collect()
        };
        Ok(wire::GetAssignmentResponse {
            data_root: data.root.display().to_string(),
            image_size: self.config.data.image_size,
            train,
            test: mine(images_of(&data.split.test)),
            label_columns: data.targets.iter().map(|&t| d.label_columns[t].clone()).collect(),
        })
    }
}
