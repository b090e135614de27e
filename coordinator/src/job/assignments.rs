//! Which images each rank reads: in the decode phase, its share of every image the job reads; then its
//! slots of every epoch's global order (the same order for any world size) and its share of the
//! validation and test images, or the labelled images of the probe sweep. Those later answers wait
//! until every rank has finished the decode phase and leave out every file that failed in it, so the
//! same images are read, in the same order, for any number of workers.

use simclr_data::dataset::{epoch_order, rank_slots, Slot};

use super::*;

impl Job {
    /// `rank`'s images: with `decode`, its share of every image the job reads (the training images,
    /// labelled or not, less those an earlier attempt found undecodable, and the labelled validation
    /// and test images) among the ranks of its host (each host decodes every image once into its own
    /// cache); else, once the decode phase is over everywhere, its slice of every global batch
    /// of `epoch`'s order (from the job's seed and the epoch alone) and every world-size-th labelled
    /// validation and test image, or with `probe` every world-size-th labelled training image instead
    /// of the slots.
    pub async fn assignment(
        &self,
        rank: u32,
        instance_id: &str,
        epoch: u64,
        probe: bool,
        decode: bool,
    ) -> Result<wire::GetAssignmentResponse, Status> {
        let (world_size, (local_index, local_count)) = {
            let state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            let hosts: Vec<&str> = state.members.iter().map(|m| m.identity.host.as_str()).collect();
            (state.members.len(), host_share(&hosts, rank as usize))
        };
        let Some(data) = &self.data else { return Ok(wire::GetAssignmentResponse::default()) };
        let usable = if decode {
            let excluded = self.lock().undecodable.keys().copied().collect();
            Arc::new(Usable::new(data, &excluded, self.config.pretrain.positives))
        } else {
            self.wait_for(|s| s.usable.is_some() || s.outcome.is_some()).await;
            let state = self.lock();
            match (&state.usable, &state.outcome) {
                (Some(usable), _) => Arc::clone(usable),
                (None, Some((notice, _))) => return Err(Status::aborted(notice.message.clone())),
                (None, None) => return Err(Status::internal("the decode phase ended without a result")),
            }
        };
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
                partner: None,
            }
        };
        // The decode phase fills each host's decode cache (workers of one host share it): the ranks of a
        // host split every image among themselves. Afterwards the ranks split the labelled images.
        let (first, every) = if decode { (local_index, local_count) } else { (rank as usize, world_size) };
        let mine = |images: &[usize]| -> Vec<wire::ImageRef> {
            images.iter().skip(first).step_by(every).map(|&i| image_ref((i, 0))).collect()
        };
        let [labelled_train, labelled_validation, labelled_test] = &usable.labelled;
        let train = if probe {
            mine(labelled_train)
        } else if decode {
            mine(&usable.training)
        } else {
            let batch = self.config.pretrain.batch_size;
            if !batch.is_multiple_of(world_size) {
                return Err(Status::failed_precondition(format!(
                    "pretrain.batch_size {batch} is not a multiple of the world size {world_size}"
                )));
            }
            let order = self.epoch_order(&usable, epoch)?;
            let seed = self.config.job.seed;
            rank_slots(&order, batch, world_size, rank as usize)
                .into_iter()
                .map(|slot| {
                    let mut r = image_ref(slot);
                    if self.config.pretrain.positives != Positives::Views {
                        r.partner = Some(Box::new(image_ref((usable.partner(seed, epoch, slot), slot.1))));
                    }
                    r
                })
                .collect()
        };
        Ok(wire::GetAssignmentResponse {
            data_root: data.root.display().to_string(),
            image_size: self.config.image_size(),
            train,
            test: mine(labelled_test),
            validation: mine(labelled_validation),
            label_columns: data.targets.iter().map(|&t| d.label_columns[t].clone()).collect(),
        })
    }

    /// `epoch`'s global order, computed once for every rank (the two latest epochs are kept).
    fn epoch_order(&self, usable: &Usable, epoch: u64) -> Result<Arc<Vec<Slot>>, Status> {
        let mut orders = usable.orders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(order) = orders.get(&epoch) {
            return Ok(Arc::clone(order));
        }
        let c = &self.config;
        let order = epoch_order(&usable.training, c.pretrain.batch_size, c.job.seed, epoch, c.data.shard_policy)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let order = Arc::new(order);
        orders.insert(epoch, Arc::clone(&order));
        while orders.len() > 2 {
            orders.pop_first();
        }
        Ok(order)
    }
}

/// The place of `rank` among the ranks that report the same host as it: (its index among them, their
/// number).
fn host_share(hosts: &[&str], rank: usize) -> (usize, usize) {
    let mine = hosts[rank];
    let index = hosts[..rank].iter().filter(|&&h| h == mine).count();
    let count = hosts.iter().filter(|&&h| h == mine).count();
    (index, count)
}

#[cfg(test)]
mod tests {
    use super::host_share;

    #[test]
    fn each_host_splits_every_image_among_its_own_ranks() {
        let hosts = ["a", "a", "b", "b", "b", "a"];
        let shares: Vec<(usize, usize)> = (0..hosts.len()).map(|r| host_share(&hosts, r)).collect();
        assert_eq!(shares, vec![(0, 3), (1, 3), (0, 3), (1, 3), (2, 3), (2, 3)]);
        // Every image decoded exactly once on each host.
        for host in ["a", "b"] {
            let mut seen: Vec<usize> = (0..hosts.len())
                .filter(|&r| hosts[r] == host)
                .flat_map(|r| {
                    let (first, every) = host_share(&hosts, r);
                    (0..10).skip(first).step_by(every)
                })
                .collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>(), "host {host}");
        }
        assert_eq!(host_share(&["h"], 0), (0, 1));
    }
}
