//! Connections that hold a slot and ask for nothing are closed.
//!
//! A client that completes TLS and then sends nothing (HTTP/1.1), or only the HTTP/2
//! preface, used to hold one of `limits.max_connections` for ever: the HTTP version is
//! detected from the first bytes, with no deadline, and HTTP/2 had no idle timeout. Each
//! connection now has a deadline that requests move: its first request must start within
//! `header_read_timeout` of the handshake, each next one within `idle_timeout` of the last
//! answer. While a request is being handled the deadline does not apply. When it passes,
//! reads see end-of-stream and hyper closes the connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the requests of one connection tell its reader.
pub struct Activity {
    in_flight: AtomicUsize,
    deadline: Mutex<Instant>,
    idle: Duration,
}

impl Activity {
    /// A connection whose first request must start within `first`, and each next one within
    /// `idle` of the previous answer.
    pub fn new(first: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            deadline: Mutex::new(Instant::now() + first),
            idle,
        })
    }

    /// Marks a request as being handled until the guard is dropped.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Held while a request is handled; its drop restarts the idle deadline.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        *self.0.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + self.0.idle;
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream whose reads end when its connection's deadline passes with no request in hand.
pub struct Guarded<S> {
    inner: S,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(activity.deadline()));
        Guarded {
            inner,
            activity,
            timer,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                if this.activity.in_flight.load(Ordering::SeqCst) > 0 {
                    return Poll::Pending;
                }
                let deadline = this.activity.deadline();
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    // End of stream: hyper closes the connection.
                    Poll::Ready(()) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections per client address, at most `max` (0: no limit).
pub struct AddressSlots {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count, given back on drop.
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    ip: IpAddr,
}

impl AddressSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(AddressSlots {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let slots = AddressSlots::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = slots.take(ip).unwrap();
        let _b = slots.take(ip).unwrap();
        assert!(slots.take(ip).is_none());
        assert!(slots.take("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(slots.take(ip).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_reads_end_of_stream_at_its_deadline() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let activity = Activity::new(Duration::from_secs(3), Duration::from_secs(60));
        let mut guarded = Guarded::new(server, activity.clone());
        let started = Instant::now();
        let mut buf = [0u8; 8];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn no_deadline_while_a_request_is_handled() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new(Duration::from_secs(3), Duration::from_secs(60));
        let mut guarded = Guarded::new(server, activity.clone());
        let guard = activity.request();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            guarded.read(&mut buf).await.unwrap()
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(reader.await.unwrap(), 1);
        drop(guard);
    }
}
