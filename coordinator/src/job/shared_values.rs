//! Values one rank publishes for the others (the NCCL unique id, TCP-ring addresses), through the
//! coordinator.

use super::*;

impl Job {
    /// Publishes `value` under `key` (a publisher) or waits until some rank has (a reader, `value`
    /// None); returns the value. Publishing a different value under a key already taken is an error:
    /// two ranks would otherwise join different NCCL communicators.
    pub async fn share_value(
        &self,
        rank: u32,
        instance_id: &str,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        const MAX_VALUE: usize = 64 << 10;
        {
            let mut state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            if let Some(value) = value {
                if value.len() > MAX_VALUE {
                    return Err(Status::invalid_argument(format!(
                        "shared value '{key}' is {} bytes; at most {MAX_VALUE}",
                        value.len()
                    )));
                }
                match state.shared.get(key) {
                    Some(old) if *old != value => {
                        return Err(Status::already_exists(format!(
                            "shared value '{key}' was already published with different contents"
                        )))
                    }
                    Some(_) => {}
                    None => {
                        tracing::debug!(rank, key, bytes = value.len(), "value published");
                        state.shared.insert(key.to_string(), value);
                        drop(state);
                        self.changed.send_replace(());
                    }
                }
            }
        }
        self.wait_for(|s| s.shared.contains_key(key) || s.outcome.is_some()).await;
        let state = self.lock();
        match (state.shared.get(key), &state.outcome) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some((notice, _))) => {
                Err(Status::aborted(format!("job {} stopped before '{key}' was published: {notice}", self.job_id)))
            }
            (None, None) => Err(Status::internal(format!("shared value '{key}' vanished"))),
        }
    }
}
