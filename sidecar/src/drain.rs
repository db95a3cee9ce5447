//! Graceful shutdown of one listener's connections at no cost per call: each connection
//! registers its task's waker once and, per poll, only reads a flag; shutdown raises the flag,
//! wakes every registered task and waits until the last connection has ended. (hyper-util's
//! `GracefulShutdown` polls a watch channel, a mutex included, every time a connection is
//! polled, several times per call.)
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use hyper::{body::Incoming, server::conn::http1};
use tokio::sync::Notify;

/// A connection that can be asked to finish its in-flight call and close.
pub trait Drainable: Future {
    fn start_draining(self: Pin<&mut Self>);
}

impl<I, S, B> Drainable for http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The connections of one listener (see the module docs).
#[derive(Default)]
pub struct DrainGroup {
    inner: Arc<DrainShared>,
}

#[derive(Default)]
struct DrainShared {
    draining: AtomicBool,
    /// Live connections by id, with the waker to call when draining starts.
    live: Mutex<LiveConnections>,
    last_ended: Notify,
}

#[derive(Default)]
struct LiveConnections {
    next_id: u64,
    wakers: HashMap<u64, Option<Waker>>,
}

impl DrainShared {
    fn live(&self) -> std::sync::MutexGuard<'_, LiveConnections> {
        // Plain bookkeeping: a panicking holder leaves nothing half-done that matters.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DrainGroup {
    /// Tracks `conn` until it ends (or is dropped).
    pub fn watch<C: Drainable>(&self, conn: C) -> Drained<C> {
        let id = {
            let mut live = self.inner.live();
            let id = live.next_id;
            live.next_id += 1;
            live.wakers.insert(id, None);
            id
        };
        Drained {
            conn: Box::pin(conn),
            group: self.inner.clone(),
            id,
            waker: None,
            draining: false,
        }
    }

    /// Connections not ended yet.
    pub fn live_connections(&self) -> usize {
        self.inner.live().wakers.len()
    }

    /// Asks every connection to finish its in-flight call and close; returns once all have
    /// ended. (Bound it with a timeout: a call may take long.)
    pub async fn shutdown(self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self
            .inner
            .live()
            .wakers
            .values()
            .flatten()
            .cloned()
            .collect();
        for waker in wakers {
            waker.wake();
        }
        loop {
            let ended = self.inner.last_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.inner.live().wakers.is_empty() {
                return;
            }
            ended.await;
        }
    }
}

/// A connection tracked by a [`DrainGroup`] (boxed once per connection, so this is `Unpin`).
pub struct Drained<C> {
    conn: Pin<Box<C>>,
    group: Arc<DrainShared>,
    id: u64,
    /// The waker registered with the group (a task's waker stays the same across polls, so this
    /// is normally set once).
    waker: Option<Waker>,
    draining: bool,
}

impl<C> Drop for Drained<C> {
    fn drop(&mut self) {
        let mut live = self.group.live();
        live.wakers.remove(&self.id);
        if live.wakers.is_empty() {
            self.group.last_ended.notify_waiters();
        }
    }
}

impl<C: Drainable> Future for Drained<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.draining {
            let registered = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if !registered {
                let waker = cx.waker().clone();
                this.group
                    .live()
                    .wakers
                    .insert(this.id, Some(waker.clone()));
                this.waker = Some(waker);
            }
            // Read after registering: a shutdown that began before is seen here, one that
            // begins after finds the waker.
            if this.group.draining.load(Ordering::SeqCst) {
                this.draining = true;
                this.conn.as_mut().start_draining();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A connection that ends only once asked to drain, and counts the requests.
    struct Idle {
        asked: Arc<std::sync::atomic::AtomicUsize>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Future for Idle {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.asked.load(Ordering::SeqCst) > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl Drainable for Idle {
        fn start_draining(self: Pin<&mut Self>) {
            self.asked.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn shutdown_drains_every_connection_and_waits_for_them() {
        let group = DrainGroup::default();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let conn = group.watch(Idle {
                asked: asked.clone(),
                polls: polls.clone(),
            });
            tasks.push(tokio::spawn(conn));
        }
        // A connection dropped before it ever ran (e.g. its task was cancelled) is forgotten.
        drop(group.watch(Idle {
            asked: asked.clone(),
            polls: polls.clone(),
        }));
        // Every connection task has run once (registered, pending) before shutdown starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while polls.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "tasks never ran");
            tokio::task::yield_now().await;
        }
        assert_eq!(group.live_connections(), 3);
        tokio::time::timeout(Duration::from_secs(5), group.shutdown())
            .await
            .expect("shutdown returns once every connection has ended");
        assert_eq!(asked.load(Ordering::SeqCst), 3, "each asked to drain once");
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_connection_still_busy() {
        let group = DrainGroup::default();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        /// Drains only when its call is done (the oneshot).
        struct Busy(tokio::sync::oneshot::Receiver<()>);
        impl Future for Busy {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                Pin::new(&mut self.0).poll(cx).map(|_| ())
            }
        }
        impl Drainable for Busy {
            fn start_draining(self: Pin<&mut Self>) {}
        }
        let conn = tokio::spawn(group.watch(Busy(finished)));
        let shutdown = tokio::spawn(group.shutdown());
        tokio::task::yield_now().await;
        assert!(!shutdown.is_finished(), "a busy connection holds shutdown");
        finish.send(()).unwrap();
        conn.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown ends with the last connection")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_with_no_connections_returns_at_once() {
        tokio::time::timeout(Duration::from_secs(5), DrainGroup::default().shutdown())
            .await
            .expect("nothing to wait for");
    }
}
