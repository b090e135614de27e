//! The coordinator's gRPC service: converts wire messages to domain calls on `Job` and back. No job
//! logic lives here.

use std::sync::Arc;

use simclr_proto::wire::{self, coordinator_server::Coordinator};
use tonic::{Request, Response, Status};

use crate::job::Job;
use crate::rendezvous::Registration;
use crate::Jobs;

pub struct CoordinatorService {
    /// The current attempt's job: a call always goes to the latest.
    pub jobs: Arc<Jobs>,
}

impl CoordinatorService {
    fn job(&self) -> Arc<Job> {
        self.jobs.get()
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn register_worker(
        &self,
        request: Request<wire::RegisterWorkerRequest>,
    ) -> Result<Response<wire::RegisterWorkerResponse>, Status> {
        let req = request.into_inner();
        let worker = req.worker.ok_or_else(|| Status::invalid_argument("RegisterWorkerRequest.worker is missing"))?;
        let registration = Registration {
            worker: worker.into(),
            requested_rank: req.requested_rank,
            expected_world_size: req.expected_world_size,
            expected_job_id: req.expected_job_id,
        };
        let job = self.job();
        let (rank, table) = job.register(registration).await?;
        Ok(Response::new(wire::RegisterWorkerResponse {
            rank,
            world_size: table.world_size(),
            job_id: job.job_id.clone(),
            config_toml: job.config_toml().to_string(),
            peers: simclr_proto::peer_table_to_wire(&table),
            attempt: job.attempt,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<wire::HeartbeatRequest>,
    ) -> Result<Response<wire::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        self.job().heartbeat(req.rank, &req.instance_id, &req.phase).map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn report_progress(
        &self,
        request: Request<wire::ReportProgressRequest>,
    ) -> Result<Response<wire::ReportProgressResponse>, Status> {
        let request = request.into_inner();
        if !request.error.is_empty() && !request.retryable {
            self.job().check_peers_of(request.rank).await;
        }
        self.job().report_progress(request)?;
        Ok(Response::new(wire::ReportProgressResponse {}))
    }

    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn report_peer_failure(
        &self,
        request: Request<wire::ReportPeerFailureRequest>,
    ) -> Result<Response<wire::ReportPeerFailureResponse>, Status> {
        let req = request.into_inner();
        let declared_lost =
            self.job().report_peer_failure(req.rank, &req.instance_id, req.peer_rank, &req.error).await?;
        Ok(Response::new(wire::ReportPeerFailureResponse { declared_lost }))
    }

    async fn get_assignment(
        &self,
        request: Request<wire::GetAssignmentRequest>,
    ) -> Result<Response<wire::GetAssignmentResponse>, Status> {
        let req = request.into_inner();
        // Waits (after the decode phase) until every rank has finished decoding: a long poll.
        self.job().assignment(req.rank, &req.instance_id, req.epoch, req.probe, req.decode).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn share_value(
        &self,
        request: Request<wire::ShareValueRequest>,
    ) -> Result<Response<wire::ShareValueResponse>, Status> {
        let req = request.into_inner();
        let value = self.job().share_value(req.rank, &req.instance_id, &req.key, req.value).await?;
        Ok(Response::new(wire::ShareValueResponse { value }))
    }

    async fn next_probe_task(
        &self,
        request: Request<wire::NextProbeTaskRequest>,
    ) -> Result<Response<wire::NextProbeTaskResponse>, Status> {
        let req = request.into_inner();
        self.job().next_probe_task(req.rank, &req.instance_id).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn report_probe_result(
        &self,
        request: Request<wire::ReportProbeResultRequest>,
    ) -> Result<Response<wire::ReportProbeResultResponse>, Status> {
        let req = request.into_inner();
        let accepted = self.job().report_probe_result(req.rank, &req.instance_id, &req.outcome_json)?;
        Ok(Response::new(wire::ReportProbeResultResponse { accepted }))
    }

    #[tracing::instrument(skip_all, fields(job = %self.jobs.get().job_id))]
    async fn deregister(
        &self,
        request: Request<wire::DeregisterRequest>,
    ) -> Result<Response<wire::DeregisterResponse>, Status> {
        let req = request.into_inner();
        self.job().deregister(req.rank, &req.instance_id, req.success, &req.reason)?;
        Ok(Response::new(wire::DeregisterResponse {}))
    }
}
