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
        let [_, labelled_validation, labelled_test] = &usable.labelled;
        let train = if probe {
            mine(&usable.probe_train)
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

/// The labelled training images of the patients (studies without a PatientID) that `probe.label_fraction`
/// keeps: every group ordered by a keyed hash of (`data.split_seed`, group), the first
/// ceil(fraction x groups) taken. A function of the dataset and the seed only, so the same for any
/// world size; refused, saying why, when a target column would have a single class.
pub(super) fn label_subset(
    images: &[usize],
    data: &crate::data_plan::PreparedData,
    fraction: f64,
    seed: u64,
) -> Result<Vec<usize>, String> {
    if fraction >= 1.0 {
        return Ok(images.to_vec());
    }
    let group_of = |i: usize| {
        let study = data.study_of[i];
        data.groups.get(study).copied().unwrap_or(study)
    };
    let mut groups: Vec<usize> = images.iter().map(|&i| group_of(i)).collect();
    groups.sort_unstable();
    groups.dedup();
    let kept: std::collections::HashSet<usize> = kept_groups(&groups, fraction, seed).into_iter().collect();
    let keep = kept.len();
    let subset: Vec<usize> = images.iter().copied().filter(|&i| kept.contains(&group_of(i))).collect();
    for &target in &data.targets {
        let values: std::collections::BTreeSet<u32> = subset
            .iter()
            .filter_map(|&i| data.dataset.studies.get(data.study_of[i]).and_then(|s| s.labels.as_ref()))
            .map(|labels| labels[target].to_bits())
            .collect();
        if values.len() < 2 {
            return Err(format!(
                "probe.label_fraction {fraction} keeps {} of {} training patients ({} images), whose '{}' labels \
                 are all the same: raise probe.label_fraction",
                keep,
                groups.len(),
                subset.len(),
                data.dataset.label_columns[target]
            ));
        }
    }
    Ok(subset)
}

/// The first ceil(fraction x n) of `groups` in the order of a keyed hash of (seed, group): a smaller
/// fraction keeps a subset of what a larger one keeps.
fn kept_groups(groups: &[usize], fraction: f64, seed: u64) -> Vec<usize> {
    let key = |g: usize| splitmix64(seed ^ 0x6c61_6265_6c73_5f31 ^ splitmix64(g as u64));
    let mut ordered = groups.to_vec();
    ordered.sort_by_key(|&g| (key(g), g));
    let keep = ((fraction * groups.len() as f64).ceil() as usize).clamp(1.min(groups.len()), groups.len());
    ordered.truncate(keep);
    ordered
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    use super::{host_share, kept_groups};

    #[test]
    fn a_label_fraction_keeps_that_share_of_patients_nested_and_seeded() {
        let groups: Vec<usize> = (0..200).map(|g| g * 3).collect();
        let ten = kept_groups(&groups, 0.1, 0);
        let twenty = kept_groups(&groups, 0.2, 0);
        assert_eq!((ten.len(), twenty.len()), (20, 40));
        assert!(ten.iter().all(|g| twenty.contains(g)), "10% is inside 20%");
        assert_eq!(ten, kept_groups(&groups, 0.1, 0), "the same seed, the same patients");
        assert_ne!(ten, kept_groups(&groups, 0.1, 1));
        assert_eq!(kept_groups(&groups, 0.001, 0).len(), 1, "at least one patient");
        assert_eq!(kept_groups(&groups, 1.0, 0).len(), 200);
        // Not the lowest-numbered patients: spread over the index.
        assert!(ten.iter().any(|&g| g > 300) && ten.iter().any(|&g| g < 300), "{ten:?}");
    }

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
