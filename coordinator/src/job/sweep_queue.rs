//! The probe sweep's work queue: tasks handed to ranks as they ask, results kept exactly once, and the
//! tasks of a rank that dies handed out again. Pure bookkeeping (the job's lock guards it); the RPCs that
//! drive it and the phase that asks come with the probe phase.

use std::collections::{BTreeMap, VecDeque};

use simclr_common::probe::{ProbeOutcome, ProbeTask};

#[derive(Debug, Clone, PartialEq)]
enum TaskState {
    Pending,
    Assigned { rank: u32 },
    Done,
}

/// What a rank asking for work gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Task(ProbeTask),
    /// Nothing to hand out now, but tasks are still running elsewhere (one may come back): ask again.
    Wait,
    /// Every task has its result.
    Finished,
}

#[derive(Debug)]
pub struct SweepQueue {
    tasks: Vec<ProbeTask>,
    state: Vec<TaskState>,
    pending: VecDeque<usize>,
    results: BTreeMap<usize, ProbeOutcome>,
}

impl SweepQueue {
    pub fn new(tasks: Vec<ProbeTask>) -> SweepQueue {
        let n = tasks.len();
        SweepQueue { tasks, state: vec![TaskState::Pending; n], pending: (0..n).collect(), results: BTreeMap::new() }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn done(&self) -> usize {
        self.results.len()
    }

    /// The next task for `rank`.
    pub fn next(&mut self, rank: u32) -> Next {
        while let Some(i) = self.pending.pop_front() {
            if self.state[i] == TaskState::Pending {
                self.state[i] = TaskState::Assigned { rank };
                return Next::Task(self.tasks[i].clone());
            }
        }
        if self.results.len() == self.tasks.len() {
            Next::Finished
        } else {
            Next::Wait
        }
    }

    /// Records a result. A task already done (handed out twice after its first rank was presumed
    /// dead) keeps its first result; returns false for such a duplicate. An unknown task id is an error.
    pub fn complete(&mut self, outcome: ProbeOutcome) -> Result<bool, String> {
        let i = outcome.task.id;
        let Some(task) = self.tasks.get(i) else {
            return Err(format!(
                "rank {} reported task {i}, but the sweep has {} tasks",
                outcome.rank,
                self.tasks.len()
            ));
        };
        if *task != outcome.task {
            return Err(format!("rank {} reported task {i} with a different configuration", outcome.rank));
        }
        if self.state[i] == TaskState::Done {
            return Ok(false);
        }
        self.state[i] = TaskState::Done;
        self.results.insert(i, outcome);
        Ok(true)
    }

    /// Puts every task assigned to `rank` and not done back at the front of the queue; returns how many.
    pub fn requeue_rank(&mut self, rank: u32) -> usize {
        let mine: Vec<usize> =
            (0..self.tasks.len()).filter(|&i| self.state[i] == TaskState::Assigned { rank }).collect();
        for &i in mine.iter().rev() {
            self.state[i] = TaskState::Pending;
            self.pending.push_front(i);
        }
        mine.len()
    }

    /// The results in task order.
    pub fn results(&self) -> Vec<ProbeOutcome> {
        self.results.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simclr_common::probe::ProbeSection;

    fn outcome(task: ProbeTask, rank: u32) -> ProbeOutcome {
        ProbeOutcome { task, rank, seconds: 0.0, curves: vec![], classes: vec![], validation: vec![], error: None }
    }

    /// Three ranks drain the default sweep; rank 2 dies holding two tasks, which the others finish.
    /// Every task ends with exactly one result, the dead rank's late report is ignored.
    #[test]
    fn every_task_is_reported_once_even_when_a_rank_dies() {
        let tasks = ProbeSection::default().expand(0);
        let n = tasks.len();
        let mut q = SweepQueue::new(tasks);
        let mut held_by_dead = Vec::new();
        for _ in 0..2 {
            match q.next(2) {
                Next::Task(t) => held_by_dead.push(t),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(q.requeue_rank(2), 2);
        let mut rank = 0;
        loop {
            match q.next(rank) {
                Next::Task(t) => {
                    assert!(q.complete(outcome(t, rank)).unwrap());
                }
                Next::Wait => panic!("nothing should be outstanding"),
                Next::Finished => break,
            }
            rank = 1 - rank;
        }
        assert_eq!(q.done(), n);
        // The presumed-dead rank reports after all: a duplicate, ignored.
        assert!(!q.complete(outcome(held_by_dead[0].clone(), 2)).unwrap());
        let results = q.results();
        assert_eq!(results.len(), n);
        assert!(results.iter().enumerate().all(|(i, r)| r.task.id == i && r.rank != 2));
    }

    #[test]
    fn a_rank_waits_while_others_hold_the_last_tasks() {
        let tasks = ProbeSection {
            seeds: 1,
            random_baseline: false,
            linear: false,
            hidden: vec![10],
            dropout: vec![0.0],
            epochs: vec![5],
            ..ProbeSection::default()
        }
        .expand(0);
        let mut q = SweepQueue::new(tasks);
        let Next::Task(t) = q.next(0) else { panic!() };
        assert_eq!(q.next(1), Next::Wait);
        // Rank 0 dies; rank 1 gets its task.
        q.requeue_rank(0);
        assert_eq!(q.next(1), Next::Task(t.clone()));
        q.complete(outcome(t.clone(), 1)).unwrap();
        assert_eq!(q.next(1), Next::Finished);
        let mut forged = outcome(t, 1);
        forged.task.id = 99;
        assert!(q.complete(forged).unwrap_err().contains("task 99"));
    }
}
