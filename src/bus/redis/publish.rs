//! The publish pipeline: one bounded queue per node, drained by one task that sends what waits
//! as a single pipeline and answers each publisher when Redis has.

use super::*;

/// What to do with a publish's outcome; runs on the pipeline task, so it must not block.
pub type PublishDone = Box<dyn FnOnce(Result<Offset, BusError>) + Send + Sync>;

/// A publish waiting for the pipeline.
pub(super) struct PublishJob {
    pub(super) key: String,
    pub(super) data: String,
    done: PublishDone,
    /// Queued at most `bus.redis_timeout` ago when sent; older, it is answered `unavailable`
    /// unsent, so a publish waits at most twice that in all.
    pub(super) deadline: tokio::time::Instant,
    /// The job's share of [`PUBLISH_QUEUE_BYTES`], given back when it is answered.
    _bytes: tokio::sync::OwnedSemaphorePermit,
    /// Counts the job in `redis_publish_queued` until it is answered or dropped.
    _queued: Queued,
}

/// One publish in `redis_publish_queued`; however the job ends, dropping it counts it out.
pub(super) struct Queued(Gauge);

impl Queued {
    fn new(gauge: &Gauge) -> Queued {
        gauge.inc();
        Queued(gauge.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RedisBus {
    pub async fn publish(&self, channel: &Channel, data: &str) -> Result<Offset, BusError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.publish_then(
            channel,
            data,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
        rx.await
            .unwrap_or(Err(BusError::Unavailable("the edge is shutting down")))
    }

    /// Queues a publish and returns once it is queued (waiting for room when the queue is
    /// full); `done` gets the outcome when Redis answered. Publishes queued by one caller are
    /// sent, and answered, in the order they were queued: even a refusal because Redis is down
    /// comes from the pipeline, behind what was queued before it.
    pub async fn publish_then(&self, channel: &Channel, data: &str, done: PublishDone) {
        // A message larger than the whole byte budget still goes, alone.
        let want = data.len().clamp(1, PUBLISH_QUEUE_BYTES) as u32;
        let Ok(bytes) = self.publish_bytes.clone().acquire_many_owned(want).await else {
            return done(Err(BusError::Unavailable("the edge is shutting down")));
        };
        let job = PublishJob {
            key: self.key(channel),
            data: data.to_owned(),
            done,
            deadline: tokio::time::Instant::now() + self.settings.timeout,
            _bytes: bytes,
            _queued: Queued::new(&self.metrics.redis_publish_queued),
        };
        if let Err(e) = self.publish_tx.send(job).await {
            (e.0.done)(Err(BusError::Unavailable("the edge is shutting down")));
        }
    }

    /// Starts the pipeline task. `stop` should fire only once nothing can publish any more
    /// (after the admin listener, which serves the publish API through the grace period).
    pub fn spawn_publisher(self: &Arc<Self>, stop: CancellationToken) {
        if let Some(rx) = self.publish_rx.lock().take() {
            tokio::spawn(self.clone().run_publisher(rx, stop));
        }
    }

    /// The pipeline task: sends whatever is queued as one pipeline, answers each publish, and
    /// repeats. At shutdown what is still queued is answered `unavailable`.
    async fn run_publisher(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<PublishJob>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => break,
                n = rx.recv_many(&mut batch, PUBLISH_BATCH) => n,
            };
            if n == 0 {
                break;
            }
            if self.server.load(Ordering::Acquire) == SERVER_UNKNOWN && self.is_ready() {
                // Redis was unreachable at start: its version is asked before the first script.
                let _ = self.check_server().await;
            }
            let results = if self.server.load(Ordering::Acquire) == SERVER_TOO_OLD {
                vec![
                    Err(BusError::Unavailable(
                        "Redis is too old (6.2 or later needed)"
                    ));
                    batch.len()
                ]
            } else if !self.is_ready() {
                // Refused here rather than by the caller, so the refusal keeps its place.
                vec![Err(BusError::Unavailable("Redis is unreachable")); batch.len()]
            } else {
                match self.cluster {
                    Some(_) => self.send_batch_cluster(&batch).await,
                    None => self.send_batch(&batch).await,
                }
            };
            for (job, result) in batch.drain(..).zip(results) {
                answer(job, result);
            }
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            answer(job, Err(BusError::Unavailable("the edge is shutting down")));
        }
    }

    /// One pipeline: the script, loaded again (a no-op when Redis has it; so a Redis that
    /// restarted never answers NOSCRIPT to part of a batch, which a retry would reorder), then
    /// one script call per job still within its deadline. One outcome per job, in order.
    async fn send_batch(&self, batch: &[PublishJob]) -> Vec<Result<Offset, BusError>> {
        let now = tokio::time::Instant::now();
        let mut outcomes: Vec<Option<Result<Offset, BusError>>> = batch
            .iter()
            .map(|job| {
                // Waited in the queue past its deadline: never sent, so a retry cannot repeat it.
                (job.deadline <= now)
                    .then_some(Err(BusError::Unavailable("publish to Redis timed out")))
            })
            .collect();
        let todo: Vec<usize> = (0..batch.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        if todo.is_empty() {
            return self.counted(fill(outcomes, "publish to Redis timed out"));
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).ignore();
        for &i in &todo {
            let job = &batch[i];
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(3)
                .arg(&job.key)
                .arg(&self.history_index)
                .arg(&self.history_sizes)
                .arg(&job.data)
                .arg(self.settings.history_len)
                .arg(self.settings.history_ttl.as_millis() as u64)
                .arg(&job.key)
                .arg(self.settings.history_ttl_unsubscribed.as_millis() as u64)
                .arg(self.settings.history_bytes)
                .arg(HISTORY_ENTRY_BYTES)
                .arg(HISTORY_CHANNEL_BYTES)
                .arg(HISTORY_TRIM_SLACK)
                .arg(self.settings.history_channel_bytes)
                .arg(HISTORY_EVICTIONS_PER_PUBLISH);
        }
        self.metrics.redis_publish_pipelines.inc();
        let mut conn = self.publisher.clone();
        let call = pipe.query_async::<Vec<redis::RedisResult<PublishReply>>>(&mut conn);
        let why = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(replies)) if replies.len() == todo.len() => {
                for (&i, reply) in todo.iter().zip(replies) {
                    outcomes[i] = Some(match reply {
                        Ok((id, evicted, bytes, channels)) => {
                            self.metrics.redis_history_evictions.inc_by(evicted);
                            self.metrics.redis_history_bytes.set(bytes);
                            if channels >= 0 {
                                self.metrics.redis_history_channels.set(channels);
                            }
                            id.parse().map_err(|_| {
                                tracing::error!(%id, "Redis returned a stream id that is not an offset");
                                BusError::Unavailable("Redis answered with an unexpected id")
                            })
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "publish to Redis failed");
                            Err(BusError::Unavailable("publish to Redis failed"))
                        }
                    });
                }
                "publish to Redis failed"
            }
            Ok(Ok(_)) => {
                tracing::error!("Redis answered a pipeline with the wrong number of replies");
                "Redis answered with unexpected replies"
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "publish to Redis failed");
                "publish to Redis failed"
            }
            Err(_) => {
                tracing::warn!("publish to Redis timed out");
                "publish to Redis timed out"
            }
        };
        self.counted(fill(outcomes, why))
    }

    /// Counts the failures among `outcomes` in `edgeplex_redis_publish_errors_total` (Redis
    /// refused or did not answer in time; a refusal while Redis is known down is not counted,
    /// as before the pipeline).
    pub(super) fn counted(
        &self,
        outcomes: Vec<Result<Offset, BusError>>,
    ) -> Vec<Result<Offset, BusError>> {
        for o in &outcomes {
            if o.is_err() {
                self.publish_errors.inc();
            }
        }
        outcomes
    }
}

/// Hands a job its outcome. A callback that panicked would otherwise end the pipeline task and
/// with it every later publish of the node; it is contained and logged instead.
pub(super) fn answer(job: PublishJob, result: Result<Offset, BusError>) {
    // The job leaves the queue's counts before its reply is pushed, so a client that has the
    // reply never sees it still counted.
    let PublishJob {
        done,
        _bytes: bytes,
        _queued: queued,
        ..
    } = job;
    drop((bytes, queued));
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result))).is_err() {
        tracing::error!("a publish callback panicked; the pipeline goes on");
    }
}

/// Every job not answered yet gets `why`.
pub(super) fn fill(
    outcomes: Vec<Option<Result<Offset, BusError>>>,
    why: &'static str,
) -> Vec<Result<Offset, BusError>> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Err(BusError::Unavailable(why))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queued(bus: &Arc<RedisBus>, data: String) -> bool {
        let ch = Channel::new("c").unwrap();
        let b = bus.clone();
        let call = async move { b.publish_then(&ch, &data, Box::new(|_| {})).await };
        tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn publish_queue_count_cap_holds() {
        let bus = RedisBus::stalled_for_tests();
        for i in 0..PUBLISH_QUEUE {
            assert!(queued(&bus, "1".into()).await, "publish {i} fits");
        }
        assert!(
            !queued(&bus, "1".into()).await,
            "one more waits for room instead of growing the queue"
        );
    }

    #[tokio::test]
    async fn publish_queue_byte_cap_holds() {
        let bus = RedisBus::stalled_for_tests();
        let big = format!("\"{}\"", "x".repeat(PUBLISH_QUEUE_BYTES / 2 - 2));
        assert!(queued(&bus, big.clone()).await);
        assert!(
            queued(&bus, big).await,
            "the budget holds exactly two halves"
        );
        assert!(
            !queued(&bus, "1".into()).await,
            "a byte more waits: the queue's bytes are capped"
        );
    }
}
