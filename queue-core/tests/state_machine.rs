//! Property tests of the task state machine, against the real store:
//! random sequences of what workers, clients and the reaper do to one task
//! (with the claim that holds it, an earlier one, or one never made) never
//! break the invariants.
//!
//! Sequences come from proptest's generators with a fixed seed (so a failure
//! reproduces); they run as async code against PostgreSQL, so proptest's
//! synchronous runner (and its shrinking) is not used: a failure prints the
//! whole sequence instead.

use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use queue_core::store::{CancelOutcome, Claim, Finish};
use queue_core::task::{NewTask, TaskRecord, TaskStatus};
use queue_core::testkit;
use serde_json::json;
use sqlx::PgPool;

#[derive(Debug, Clone)]
enum Op {
    /// A worker claims it (lease 0 means it lapses at once).
    Claim {
        lease_zero: bool,
    },
    /// A worker reports an outcome for a claim: the latest (offset 0), the
    /// one before it (-1), or one never made (1).
    Finish {
        offset: i32,
        kind: u8,
    },
    Cancel,
    /// The reaper runs.
    Reap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(|lease_zero| Op::Claim { lease_zero }),
        4 => ((-1i32..=1), 0u8..4).prop_map(|(offset, kind)| Op::Finish { offset, kind }),
        1 => Just(Op::Cancel),
        2 => Just(Op::Reap),
    ]
}

fn finish_of(kind: u8) -> Finish {
    match kind {
        0 => Finish::Succeeded {
            result: json!({"text": "ok"}),
        },
        1 => Finish::Retry {
            error: "transient".into(),
            // Due at once, so a later claim can take it.
            run_at: Utc::now() - chrono::Duration::seconds(1),
        },
        2 => Finish::Failed {
            error: "permanent".into(),
        },
        _ => Finish::Released {
            reason: "test".into(),
        },
    }
}

/// What must hold of a task record at every step.
fn check(t: &TaskRecord, history_len: usize, succeeded_rows: usize, ops: &[Op]) {
    assert!(
        t.attempts >= 0 && t.attempts <= t.max_attempts,
        "attempts out of range after {ops:?}: {t:?}"
    );
    assert_eq!(
        t.result.is_some(),
        t.status == TaskStatus::Succeeded,
        "a result exactly when succeeded, after {ops:?}"
    );
    assert!(succeeded_rows <= 1, "two successful attempts after {ops:?}");
    assert_eq!(
        succeeded_rows == 1,
        t.status == TaskStatus::Succeeded,
        "after {ops:?}"
    );
    assert_eq!(
        t.finished_at.is_some(),
        t.status.is_terminal(),
        "finished_at set exactly when terminal, after {ops:?}"
    );
    assert!(
        history_len >= t.attempts as usize,
        "every attempt has a history row, after {ops:?}"
    );
}

#[sqlx::test(migrator = "queue_core::MIGRATOR")]
async fn random_histories_keep_the_invariants(pool: PgPool) {
    let svc = testkit::service(pool);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = (1i32..=3, proptest::collection::vec(op(), 1..16));
    for _case in 0..300 {
        let (max_attempts, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let task = NewTask::from_json(
            &json!({"model": "m", "prompt": "p", "max_attempts": max_attempts}),
            "",
        )
        .unwrap();
        let id = svc.submit(&task).await.unwrap().ids[0];
        let mut terminal: Option<TaskStatus> = None;
        let mut claims: Vec<Claim> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let before = svc.store.task(id).await.unwrap().unwrap();
            let done = &ops[..=i];
            match op {
                Op::Claim { lease_zero } => {
                    let lease = if *lease_zero {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(30)
                    };
                    let claimed = svc.store.claim(&[id], lease).await.unwrap();
                    claims.extend(claimed.iter().map(|t| t.claim()));
                    let claimable =
                        matches!(before.status, TaskStatus::Queued | TaskStatus::Scheduled);
                    assert_eq!(
                        claimed.len() == 1,
                        claimable,
                        "claim of a {} task, after {done:?}",
                        before.status
                    );
                }
                Op::Finish { offset, kind } => {
                    let claim = match offset {
                        0 => claims.last().copied(),
                        -1 => claims.len().checked_sub(2).map(|i| claims[i]),
                        _ => None,
                    }
                    .unwrap_or(Claim {
                        token: uuid::Uuid::new_v4(),
                        attempt: before.attempts,
                    });
                    let wrote = svc
                        .store
                        .finish(id, claim, &finish_of(*kind))
                        .await
                        .unwrap();
                    let holds = before.status == TaskStatus::Running && *offset == 0;
                    assert_eq!(wrote, holds, "fenced write, after {done:?}");
                    if !wrote {
                        let after = svc.store.task(id).await.unwrap().unwrap();
                        assert_eq!(
                            (
                                after.status,
                                after.attempts,
                                &after.result,
                                &after.error,
                                after.finished_at
                            ),
                            (
                                before.status,
                                before.attempts,
                                &before.result,
                                &before.error,
                                before.finished_at
                            ),
                            "a fenced write changed the task, after {done:?}"
                        );
                    }
                }
                Op::Cancel => {
                    let out = svc.store.cancel(id, None).await.unwrap();
                    let open = !before.status.is_terminal();
                    assert_eq!(
                        matches!(out, CancelOutcome::Cancelled(_)),
                        open,
                        "cancel, after {done:?}"
                    );
                }
                Op::Reap => {
                    svc.store.reap_expired(100).await.unwrap();
                }
            }
            let after = svc.store.task(id).await.unwrap().unwrap();
            let history = svc.store.history(id).await.unwrap();
            let wins = history
                .iter()
                .filter(|h| h.outcome.as_deref() == Some("succeeded"))
                .count();
            check(&after, history.len(), wins, done);
            if let Some(s) = terminal {
                assert_eq!(
                    after.status, s,
                    "left the terminal state {s}, after {done:?}"
                );
                assert_eq!(after.finished_at, before.finished_at);
            }
            if after.status.is_terminal() {
                terminal = Some(after.status);
            }
        }
    }
    svc.queue.purge().await.unwrap();
}
