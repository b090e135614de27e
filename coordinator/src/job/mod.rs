//! The job's shared state and its state machine: rendezvous -> phases -> stop -> drain. Owns liveness
//! (heartbeat deadlines, lost workers), progress, stop notices and the job outcome. The gRPC handlers in
//! `service` and the dev-mode launcher only call into it; it never touches sockets except to push stop
//! notices to workers and to check a peer that another worker reported.
//!
//! Locking: one std mutex around `State`, never held across an await. Every change bumps a watch
//! channel, and waiters re-check their condition after each bump.
//!
//! Each concern lives in its own file: `membership` (rendezvous, liveness, departures), `phases`
//! (progress), `outcome` (the stop), `shared_values`, `assignments`, `sweep` (the probe tasks, with the queue
//! in `sweep_queue`), `driver` (the job from start to end); the plain types others read are in `crate::events`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use simclr_common::pretrain::Positives;
use simclr_common::probe::ProbeOutcome;
use simclr_common::{ExitStatus, JobConfig, PeerTable, StopNotice, StopReason, PHASES};
use simclr_proto::client::{lazy_channel, worker_client, AttachToken, WorkerClient};
use simclr_proto::wire;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::data_plan::PreparedData;
use crate::rendezvous::{Registration, Rendezvous, RendezvousError};
use crate::run_dir::{RunDir, UndecodableFile};
use sweep::probe_fingerprint;
use sweep_queue::{Next, SweepQueue};

mod assignments;
mod driver;
mod membership;
mod outcome;
mod phases;
mod shared_values;
mod sweep;
pub mod sweep_queue;

pub use crate::events::{JobEvent, JobOutcome, Member, MemberStatus};

/// The phase whose failures are final for the job (`State::undecodable`).
const PHASE_DECODE: &str = "decode";

struct State {
    rendezvous: Rendezvous,
    members: Vec<Member>,
    /// phase -> rank -> metric -> value
    results: BTreeMap<String, BTreeMap<u32, BTreeMap<String, f64>>>,
    /// Files the workers could not use, one entry per file: path -> (phase, rank, reason).
    file_issues: BTreeMap<String, (String, u32, String)>,
    outcome: Option<(StopNotice, ExitStatus)>,
    /// Whether the recorded outcome is a retryable failure.
    retryable: bool,
    /// Values published by one rank for the others (`share_value`).
    shared: BTreeMap<String, Vec<u8>>,
    /// The probe sweep's queue, from the first rank that asks for a task.
    sweep: Option<SweepQueue>,
    /// Ranks lost during the sweep: their tasks went back to the queue, the job goes on without them.
    excused: BTreeSet<u32>,
    /// Probe results an earlier attempt (or coordinator) recorded for this configuration; the sweep
    /// starts with them done.
    recovered: Vec<ProbeOutcome>,
    /// Images (by index) that failed in the decode phase, with the reason: this attempt's, and those an
    /// earlier one recorded in the run directory (`undecodable.json`), which no worker is given again.
    undecodable: BTreeMap<usize, String>,
    /// What pretraining and the probes read, fixed once every rank has finished the decode phase.
    usable: Option<Arc<Usable>>,
}

/// The images left for pretraining and the probes once the decode phase is over, and what every rank's
/// assignment is cut from, computed once for all ranks.
#[derive(Debug)]
pub(crate) struct Usable {
    /// The training images that decoded, sorted: what every epoch's order shuffles.
    training: Vec<usize>,
    /// The labelled images of each side (train, validation, test) that decoded, sorted.
    labelled: [Vec<usize>; 3],
    /// The labelled training images the probes learn from: all of `labelled[0]`, or the share of its
    /// patients `probe.label_fraction` keeps (set once the decode phase is over).
    probe_train: Vec<usize>,
    /// The epochs' global orders computed so far; the two latest are kept (the ranks ask for an epoch
    /// at about the same time, and never for one more than an epoch behind the others).
    orders: Mutex<BTreeMap<u64, Arc<Vec<simclr_data::dataset::Slot>>>>,
    /// With `pretrain.positives` other than "views": each training image's candidates for its second
    /// view (the other usable training images of its study or patient), sorted.
    partners: std::collections::HashMap<usize, Vec<usize>>,
}

/// `file_issues` as the rows of `worker_file_issues.csv`: (phase, rank, path, reason), by path.
fn issue_rows(issues: &BTreeMap<String, (String, u32, String)>) -> Vec<(String, u32, String, String)> {
    issues.iter().map(|(path, (phase, rank, reason))| (phase.clone(), *rank, path.clone(), reason.clone())).collect()
}

impl Usable {
    fn new(data: &PreparedData, excluded: &BTreeSet<usize>, positives: Positives) -> Usable {
        let training: Vec<usize> = data.training_images.iter().copied().filter(|i| !excluded.contains(i)).collect();
        let partners = partner_candidates(&data.study_of, &data.groups, &training, positives);
        let labelled_of = |studies: &[usize]| {
            let mut images: Vec<usize> = studies
                .iter()
                .map(|&i| &data.dataset.studies[i])
                .filter(|s| s.labels.is_some())
                .flat_map(|s| s.images.iter().copied())
                .filter(|i| !excluded.contains(i))
                .collect();
            images.sort_unstable();
            images
        };
        let labelled =
            [labelled_of(&data.split.train), labelled_of(&data.split.validation), labelled_of(&data.split.test)];
        let probe_train = labelled[0].clone();
        Usable { training, labelled, probe_train, orders: Mutex::new(BTreeMap::new()), partners }
    }

    /// The image a slot's second view comes from: one of its candidates, drawn from (seed, epoch, image,
    /// occurrence) alone, so the same for any world size; the image itself when it has none.
    fn partner(&self, seed: u64, epoch: u64, (image, occurrence): simclr_data::dataset::Slot) -> usize {
        match self.partners.get(&image) {
            Some(c) if !c.is_empty() => {
                let h = simclr_data::cache::fnv1a(
                    &[
                        seed.to_le_bytes(),
                        epoch.to_le_bytes(),
                        (image as u64).to_le_bytes(),
                        u64::from(occurrence).to_le_bytes(),
                    ]
                    .concat(),
                );
                c[(h % c.len() as u64) as usize]
            }
            _ => image,
        }
    }
}

/// Each training image's other usable training images of the same study (`SameStudy`) or patient
/// (`SamePatient`: the study's bootstrap group, the patient where known); empty for `Views`.
fn partner_candidates(
    study_of: &[usize],
    groups: &[usize],
    training: &[usize],
    positives: Positives,
) -> std::collections::HashMap<usize, Vec<usize>> {
    let key = |image: usize| -> Option<usize> {
        let study = study_of[image];
        match positives {
            Positives::Views => None,
            Positives::SameStudy => Some(study),
            Positives::SamePatient => Some(groups.get(study).copied().unwrap_or(study)),
        }
    };
    let mut members: std::collections::HashMap<usize, Vec<usize>> = std::collections::HashMap::new();
    for &image in training {
        if let Some(k) = key(image) {
            members.entry(k).or_default().push(image);
        }
    }
    training
        .iter()
        .filter_map(|&image| {
            let group = members.get(&key(image)?)?;
            Some((image, group.iter().copied().filter(|&j| j != image).collect()))
        })
        .collect()
}

pub struct Job {
    pub job_id: String,
    pub config: JobConfig,
    config_toml: String,
    token: AttachToken,
    run_dir: RunDir,
    started: Instant,
    state: Mutex<State>,
    changed: watch::Sender<()>,
    events: broadcast::Sender<JobEvent>,
    worker_clients: OnceLock<Vec<WorkerClient>>,
    data: Option<Arc<PreparedData>>,
    /// 0 for the first attempt, k for the k-th restart.
    pub attempt: u32,
}

impl Job {
    /// `config` must be validated and carry the final job id. `attempt`: 0, or the restart's number.
    pub fn new(
        config: JobConfig,
        token: Option<&str>,
        run_dir: RunDir,
        data: Option<Arc<PreparedData>>,
        attempt: u32,
    ) -> Result<Arc<Job>, Status> {
        let job_id = config.job.id.clone();
        let world_size = config.cluster.world_size;
        let (changed, _) = watch::channel(());
        let (events, _) = broadcast::channel(1024);
        let recorded = data.as_deref().map(|d| recorded_undecodable(&run_dir, d)).unwrap_or_default();
        let file_issues = recorded
            .iter()
            .map(|(_, f)| (f.path.clone(), (PHASE_DECODE.to_string(), f.rank, f.reason.clone())))
            .collect();
        let undecodable = recorded.into_iter().map(|(i, f)| (i, f.reason)).collect();
        let recovered = match run_dir.open_probe_journal(&probe_fingerprint(&config)) {
            Ok(recovered) => recovered,
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the probe journal; probe results will not survive a restart");
                Vec::new()
            }
        };
        Ok(Arc::new(Job {
            attempt,
            config_toml: config.to_toml(),
            token: AttachToken::new(token)?,
            run_dir,
            started: Instant::now(),
            state: Mutex::new(State {
                rendezvous: Rendezvous::new(job_id.clone(), world_size, simclr_common::VERSION),
                members: Vec::new(),
                results: BTreeMap::new(),
                file_issues,
                outcome: None,
                retryable: false,
                shared: BTreeMap::new(),
                sweep: None,
                excused: BTreeSet::new(),
                recovered,
                undecodable,
                usable: None,
            }),
            changed,
            events,
            worker_clients: OnceLock::new(),
            data,
            job_id,
            config,
        }))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the state itself stays consistent
        // because every mutation is a single assignment, so keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: JobEvent) {
        let _ = self.events.send(event);
        self.changed.send_replace(());
    }

    /// Waits until `done` holds for the state (checked after every change).
    async fn wait_for(&self, mut done: impl FnMut(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if done(&self.lock()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn peer_table(&self) -> Option<PeerTable> {
        self.lock().rendezvous.table().cloned()
    }

    pub fn members(&self) -> Vec<Member> {
        self.lock().members.clone()
    }

    pub fn stop_notice(&self) -> Option<StopNotice> {
        self.lock().outcome.as_ref().map(|(n, _)| n.clone())
    }
}

/// The images an earlier attempt found undecodable and recorded in `run_dir`, where the file is still
/// the same (same path, size and modification time): a file replaced since is tried again.
fn recorded_undecodable(run_dir: &RunDir, data: &PreparedData) -> Vec<(usize, UndecodableFile)> {
    let mut out = Vec::new();
    for file in run_dir.read_undecodable() {
        let Some(&i) = data.image_of_path.get(&file.path) else { continue };
        let img = &data.dataset.index.images[i];
        if img.file_size == file.file_size && u64::try_from(img.modified_ns).unwrap_or(u64::MAX) == file.modified_ns {
            out.push((i, file));
        }
    }
    if !out.is_empty() {
        tracing::info!(files = out.len(), "files an earlier attempt could not decode are left out (undecodable.json)");
    }
    out
}

#[cfg(test)]
mod tests {
    use simclr_common::WorkerIdentity;

    use super::*;
    use std::path::Path;

    #[test]
    fn a_partner_is_another_training_image_of_the_study_or_patient_drawn_the_same_way_every_time() {
        // Images 0-1 in study 0, 2 in study 1, 3-4 in study 2; studies 0 and 1 are one patient (group 0),
        // study 2 its own (group 2). Image 4 is not a training image (it failed to decode).
        let study_of = [0, 0, 1, 2, 2];
        let groups = [0, 0, 2];
        let training = [0, 1, 2, 3];
        let by_study = partner_candidates(&study_of, &groups, &training, Positives::SameStudy);
        assert_eq!(by_study[&0], vec![1]);
        assert_eq!(by_study[&2], Vec::<usize>::new());
        assert_eq!(by_study[&3], Vec::<usize>::new(), "image 4 is not usable");
        let by_patient = partner_candidates(&study_of, &groups, &training, Positives::SamePatient);
        assert_eq!(by_patient[&2], vec![0, 1]);
        assert!(partner_candidates(&study_of, &groups, &training, Positives::Views).is_empty());

        let usable = Usable {
            training: training.to_vec(),
            labelled: Default::default(),
            probe_train: Vec::new(),
            orders: Mutex::new(BTreeMap::new()),
            partners: by_patient,
        };
        assert_eq!(usable.partner(7, 0, (3, 0)), 3, "no other image: the image itself");
        assert_eq!(usable.partner(7, 0, (0, 0)), 1);
        // Image 2's partner is 0 or 1, the same on every call, and both come up over the epochs.
        let drawn: Vec<usize> = (0..40).map(|e| usable.partner(7, e, (2, 0))).collect();
        assert_eq!(drawn, (0..40).map(|e| usable.partner(7, e, (2, 0))).collect::<Vec<_>>());
        assert!(drawn.contains(&0) && drawn.contains(&1) && !drawn.contains(&2), "{drawn:?}");
    }

    fn worker(n: u32) -> Registration {
        Registration {
            worker: WorkerIdentity {
                instance_id: format!("w{n}"),
                host: "localhost".into(),
                peer_addr: format!("127.0.0.1:{}", 40000 + n),
                device: "cpu".into(),
                pid: n,
                version: simclr_common::VERSION.into(),
            },
            requested_rank: Some(n),
            expected_world_size: None,
            expected_job_id: String::new(),
        }
    }

    async fn two_member_job(dir: &Path) -> Arc<Job> {
        let mut config = JobConfig::default();
        config.job.id = "share-test".into();
        config.cluster.world_size = 2;
        let job = Job::new(config, None, RunDir::create(dir).unwrap(), None, 0).unwrap();
        let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
        assert_eq!((a.unwrap().0, b.unwrap().0), (0, 1));
        job
    }

    /// A lost worker is a retryable failure: with restarts left, the notice says so and a worker that
    /// registers before the next attempt is told UNAVAILABLE (it retries); without, it says none are
    /// left and such a worker is refused for good. A worker's failure it marks permanent says so.
    #[tokio::test]
    async fn a_lost_worker_is_retryable_and_a_permanent_failure_is_not() {
        for (max_restarts, restarts_left) in [(2, true), (0, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = JobConfig::default();
            config.job.id = "restart-test".into();
            config.cluster.world_size = 2;
            config.cluster.max_restarts = max_restarts;
            let job = Job::new(config, None, RunDir::create(dir.path()).unwrap(), None, 0).unwrap();
            let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
            assert!(a.is_ok() && b.is_ok());
            assert!(job.declare_lost(1, "killed".into()));
            let notice = job.stop_notice().unwrap();
            assert_eq!(notice.message.contains("restarting from the last checkpoint (restart 1 of 2)"), restarts_left);
            assert_eq!(notice.message.contains("no restarts left"), !restarts_left, "{notice}");
            let e = job.register(worker(2)).await.unwrap_err();
            let expected = if restarts_left { tonic::Code::Unavailable } else { tonic::Code::FailedPrecondition };
            assert_eq!(e.code(), expected, "{e:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let job = two_member_job(dir.path()).await;
        let request = wire::ReportProgressRequest {
            rank: 0,
            instance_id: "w0".into(),
            phase: "decode".into(),
            error: "train/broken.dcm: not a DICOM file".into(),
            retryable: false,
            ..Default::default()
        };
        job.report_progress(request).unwrap();
        let notice = job.stop_notice().unwrap();
        assert!(notice.message.ends_with("a permanent failure: not restarted"), "{notice}");
    }

    /// A 2-worker job on `studies` synthetic studies written under `dir`, global batch 4, and its
    /// prepared data.
    fn synthetic_job(dir: &Path, id: &str, studies: usize) -> (JobConfig, PreparedData) {
        let data_dir = dir.join("data");
        let opts = simclr_data::synth::SynthOptions { studies, seed: 3, image_size: 32 };
        simclr_data::synth::write_dataset(&data_dir, &opts).unwrap();
        let mut config = JobConfig::default();
        config.job.id = id.into();
        config.cluster.world_size = 2;
        config.data.path = Some(data_dir);
        config.pretrain.batch_size = 4;
        let prepared = crate::data_plan::prepare(&config.data, Some(config.pretrain.batch_size)).unwrap();
        (config, prepared)
    }

    /// Every assigned image carries its study's target label, and the columns are named.
    #[tokio::test]
    async fn assignments_carry_the_target_labels() {
        let dir = tempfile::tempdir().unwrap();
        let (config, prepared) = synthetic_job(dir.path(), "labels-test", 16);
        let mut truth: BTreeMap<String, f32> = BTreeMap::new();
        for study in &prepared.dataset.studies {
            let value = study.labels.as_ref().unwrap()[prepared.targets[0]];
            for &i in &study.images {
                truth.insert(prepared.dataset.index.images[i].sop_uid.clone(), value);
            }
        }
        let run_dir = RunDir::create(&dir.path().join("run")).unwrap();
        let job = Job::new(config, None, run_dir, Some(Arc::new(prepared)), 0).unwrap();
        let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
        assert!(a.is_ok() && b.is_ok());
        let mut seen = 0;
        for rank in 0..2 {
            let response = job.assignment(rank, &format!("w{rank}"), 0, false, true).await.unwrap();
            assert_eq!(response.label_columns, vec!["Typical Appearance".to_string()]);
            for image in response.train.iter().chain(&response.test) {
                assert_eq!(image.labels, vec![truth[&image.sop_uid]], "{}", image.path);
                seen += 1;
            }
        }
        assert!(seen > 0);
        assert!(truth.values().any(|&v| v == 1.0) && truth.values().any(|&v| v == 0.0));
    }

    /// A file that fails in the decode phase is final for the job: pretraining and probe assignments
    /// wait until every rank has decoded, then leave it out of every epoch and every side; the run
    /// directory lists it once; a restarted job (a new `Job` on the same run directory) does not even
    /// hand it out for decoding, unless the file has changed since.
    #[tokio::test]
    async fn a_file_that_fails_to_decode_is_never_handed_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let (config, prepared) = synthetic_job(dir.path(), "decode-test", 24);
        let prepared = Arc::new(prepared);
        let bad_index = prepared.training_images[3];
        let bad = prepared.dataset.index.images[bad_index].path.display().to_string();
        let run_path = dir.path().join("run");
        let new_job = || {
            let job =
                Job::new(config.clone(), None, RunDir::create(&run_path).unwrap(), Some(Arc::clone(&prepared)), 0)
                    .unwrap();
            async move {
                let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
                assert!(a.is_ok() && b.is_ok());
                job
            }
        };
        let done = |rank: u32, phase: &str, issues: Vec<wire::FileIssue>| wire::ReportProgressRequest {
            rank,
            instance_id: format!("w{rank}"),
            phase: phase.into(),
            phase_done: true,
            issues,
            ..Default::default()
        };
        let paths = |images: &[wire::ImageRef]| images.iter().map(|i| i.path.clone()).collect::<Vec<_>>();

        let job = new_job().await;
        let decode0 = job.assignment(0, "w0", 0, false, true).await.unwrap();
        let decode1 = job.assignment(1, "w1", 0, false, true).await.unwrap();
        let handed_out: Vec<String> = paths(&decode0.train).into_iter().chain(paths(&decode1.train)).collect();
        assert_eq!(handed_out.len(), prepared.training_images.len(), "each training image once");
        assert!(handed_out.contains(&bad));

        let waiting = {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.assignment(0, "w0", 0, false, false).await })
        };
        for rank in 0..2 {
            job.report_progress(done(rank, "preflight", vec![])).unwrap();
        }
        let issue = wire::FileIssue { path: bad.clone(), reason: "decode: pixel data cannot be decoded".into() };
        job.report_progress(done(0, "decode", vec![issue.clone()])).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a pretraining assignment was answered before every rank had decoded");
        // The same file reported again (another phase, another rank) stays one row.
        job.report_progress(done(1, "decode", vec![issue])).unwrap();
        let epoch0 = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        let mut seen = paths(&epoch0.train);
        for epoch in 0..3 {
            for rank in 0..2 {
                let a = job.assignment(rank, &format!("w{rank}"), epoch, false, false).await.unwrap();
                seen.extend(paths(&a.train).into_iter().chain(paths(&a.validation)).chain(paths(&a.test)));
            }
        }
        for rank in 0..2 {
            seen.extend(paths(&job.assignment(rank, &format!("w{rank}"), 0, true, false).await.unwrap().train));
        }
        assert!(!seen.is_empty() && !seen.contains(&bad), "{bad} was handed out after it failed to decode");

        let issues = std::fs::read_to_string(run_path.join("worker_file_issues.csv")).unwrap();
        assert_eq!(issues.lines().filter(|l| l.contains(&bad)).count(), 1, "{issues}");
        let dataset: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run_path.join("dataset.json")).unwrap()).unwrap();
        assert_eq!(dataset["usable_images"], prepared.dataset.index.images.len() - 1, "{dataset}");
        assert_eq!(dataset["unusable_by_kind"]["undecodable"], 1, "{dataset}");

        // A restart remembers the file: not even the decode phase gets it.
        let restarted = new_job().await;
        let decode0 = restarted.assignment(0, "w0", 0, false, true).await.unwrap();
        let decode1 = restarted.assignment(1, "w1", 0, false, true).await.unwrap();
        let handed_out: Vec<String> = paths(&decode0.train).into_iter().chain(paths(&decode1.train)).collect();
        assert_eq!(handed_out.len(), prepared.training_images.len() - 1);
        assert!(!handed_out.contains(&bad));
        assert_eq!(restarted.lock().file_issues.len(), 1, "the restarted job lists the file it remembers");
    }

    /// The NCCL unique id's path: readers wait for the publisher, members only, one value per key,
    /// and a job that stops releases the readers with an error instead of leaving them waiting.
    #[tokio::test]
    async fn a_shared_value_reaches_readers_that_asked_before_it_was_published() {
        let dir = tempfile::tempdir().unwrap();
        let job = two_member_job(dir.path()).await;
        let reader = {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.share_value(1, "w1", "nccl-unique-id/pretrain", None).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the reader did not wait for the value");
        let id = vec![7u8; 128];
        assert_eq!(job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(id.clone())).await.unwrap(), id);
        assert_eq!(reader.await.unwrap().unwrap(), id);
        // Publishing the same value again is harmless; a different one is refused.
        assert!(job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(id.clone())).await.is_ok());
        let e = job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(vec![1; 128])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        let e = job.share_value(1, "intruder", "nccl-unique-id/pretrain", None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let e = job.share_value(0, "w0", "big", Some(vec![0; 65 << 10])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

        let waiting = {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.share_value(1, "w1", "never", None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        job.abort(StopReason::Aborted, "rank 0 failed".into(), ExitStatus::JobAborted);
        let e = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
        assert!(e.message().contains("rank 0 failed"), "{e:?}");
    }
}
