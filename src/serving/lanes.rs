//! Per-tenant I/O lanes: each tenant's connections are served (TLS, HTTP/2,
//! message decoding and encoding) on a tokio runtime of their own.
//!
//! Why: moving a 25 MB image through TLS and HTTP/2 costs far more CPU than
//! the kernels, and a tokio runtime runs its tasks first come, first served
//! without preemption. On one shared runtime, a tenant streaming 4K images
//! keeps every I/O thread busy with multi-millisecond polls, and another
//! tenant's 256×256 request waits behind them in the run queue (measured:
//! its p99 rose from ~1 ms to 6–8 ms, while the pixel work itself was
//! already fairly scheduled by [`crate::tenancy`]). With a lane per tenant
//! the operating system shares the cores between the lanes' threads, at a
//! granularity of microseconds, and a flood only queues behind itself.
//!
//! The acceptor (the server's own runtime) runs the TCP accept and the TLS
//! handshake, which names the tenant; the connection is then moved to that
//! tenant's lane, re-registered with the lane's reactor ([`LaneTcp`]), and
//! served by the lane's copy of the gRPC router. Lanes are created on first
//! use, at most `server.max_io_lanes`; tenants beyond that, and connections
//! of peers the server does not serve (no tenant identity, or a tenant not
//! configured: refused by the interceptor anyway), share one lane. Those
//! peers' connections have an allowance of their own
//! ([`UNSERVED_ALLOWANCE`]) and a short life ([`UNSERVED_LIFETIME`]).
//! Each lane has `server.io_threads` threads (named `imgsvc-io-N`); they
//! sleep when the lane is idle. `imgsvc_io_lane{tenant}` is 1 for each
//! lane started (`tenant="(shared)"` for the shared one), until shutdown.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    runtime::{Handle, Runtime},
    sync::mpsc,
    task::JoinHandle,
};

use crate::identity::TenantId;

/// Serves the connections received on a lane until the sender is dropped,
/// then drains them (the router's graceful shutdown).
pub type ServeLane<C> = Arc<dyn Fn(mpsc::Receiver<C>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LaneKey {
    Tenant(TenantId),
    Shared,
}

/// The `tenant` label of the shared lane in `imgsvc_io_lane`; no tenant
/// name can take this form.
pub const SHARED_LANE: &str = "(shared)";

impl LaneKey {
    /// The `tenant` label of `imgsvc_io_lane`.
    fn label(&self) -> String {
        match self {
            LaneKey::Tenant(t) => t.to_string(),
            LaneKey::Shared => SHARED_LANE.to_string(),
        }
    }
}

/// Where to send a connection: its lane's queue and runtime.
pub struct LaneHandle<C> {
    pub connections: mpsc::Sender<C>,
    pub runtime: Handle,
}

struct Lane<C> {
    connections: mpsc::Sender<C>,
    runtime: Handle,
}

struct Inner<C> {
    open: bool,
    lanes: HashMap<LaneKey, Lane<C>>,
    runtimes: Vec<Runtime>,
    served: Vec<JoinHandle<()>>,
}

/// The lanes of one server; `C` is the connection type.
pub struct IoLanes<C> {
    inner: Mutex<Inner<C>>,
    serve: ServeLane<C>,
    threads: usize,
    max_lanes: usize,
}

impl<C: Send + 'static> IoLanes<C> {
    /// Lanes of `threads` threads each, at most `max_lanes` of them.
    pub fn new(threads: usize, max_lanes: usize, serve: ServeLane<C>) -> Self {
        let inner = Inner { open: true, lanes: HashMap::new(), runtimes: Vec::new(), served: Vec::new() };
        Self { inner: Mutex::new(inner), serve, threads: threads.max(1), max_lanes: max_lanes.max(1) }
    }

    /// The lane for a connection of `tenant` (`None`: no tenant identity),
    /// started on first use. `Ok(None)` once [`IoLanes::close`] was called.
    pub fn lane(&self, tenant: Option<&TenantId>) -> std::io::Result<Option<LaneHandle<C>>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.open {
            return Ok(None);
        }
        let mut key = tenant.map_or(LaneKey::Shared, |t| LaneKey::Tenant(t.clone()));
        if !inner.lanes.contains_key(&key) {
            // Keep one lane for the shared key: tenants past the cap use it.
            let tenant_lanes = inner.lanes.keys().filter(|k| matches!(k, LaneKey::Tenant(_))).count();
            if key != LaneKey::Shared && tenant_lanes + 1 >= self.max_lanes {
                key = LaneKey::Shared;
            }
        }
        if !inner.lanes.contains_key(&key) {
            let n = inner.runtimes.len();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.threads)
                .thread_name(format!("imgsvc-io-{n}"))
                .enable_all()
                .build()?;
            let (connections, incoming) = mpsc::channel(64);
            let served = runtime.spawn((self.serve)(incoming));
            let lane = Lane { connections, runtime: runtime.handle().clone() };
            inner.served.push(served);
            inner.runtimes.push(runtime);
            inner.lanes.insert(key.clone(), lane);
            metrics::gauge!("imgsvc_io_lanes").set(inner.lanes.len() as f64);
            metrics::gauge!("imgsvc_io_lane", "tenant" => key.label()).set(1.0);
            match &key {
                LaneKey::Tenant(t) => tracing::debug!(tenant = %t, lane = n, "I/O lane started"),
                LaneKey::Shared => tracing::debug!(lane = n, "shared I/O lane started"),
            }
        }
        let lane = &inner.lanes[&key];
        Ok(Some(LaneHandle { connections: lane.connections.clone(), runtime: lane.runtime.clone() }))
    }

    /// Stops taking connections: every lane drains its connections and
    /// ends. Returns the lanes' tasks, to await.
    pub fn close(&self) -> Vec<JoinHandle<()>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.open = false;
        for key in inner.lanes.keys() {
            metrics::gauge!("imgsvc_io_lane", "tenant" => key.label()).set(0.0);
        }
        inner.lanes.clear();
        std::mem::take(&mut inner.served)
    }

    /// Number of lanes started so far.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).runtimes.len()
    }

    /// Whether no lane was started yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<C> Drop for IoLanes<C> {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its threads end, which tokio
        // refuses inside async code: let them end in the background.
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for runtime in inner.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// How many connections of peers the server does not serve (no tenant
/// identity, or a tenant without a table when `unknown_tenants = "refuse"`)
/// may be open at once, all together.
pub const UNSERVED_ALLOWANCE: usize = 16;

/// How long such a connection lives: long enough to be told why its calls
/// are refused (PERMISSION_DENIED, UNAUTHENTICATED), then it is closed
/// gracefully (GOAWAY) and, after [`UNSERVED_GRACE`], cut, whatever is open
/// on it (a health `Watch` included).
pub const UNSERVED_LIFETIME: std::time::Duration = std::time::Duration::from_secs(2);
pub const UNSERVED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The connections of unserved peers: at most [`UNSERVED_ALLOWANCE`] at
/// once, none with a lane of its own (they go to the shared lane).
#[derive(Clone, Debug, Default)]
pub struct UnservedConnections(Arc<std::sync::atomic::AtomicUsize>);

/// One unserved connection's place in the allowance, given back on drop.
#[derive(Debug)]
pub struct UnservedSlot(Arc<std::sync::atomic::AtomicUsize>);

impl UnservedConnections {
    /// A place for one more, if the allowance has one.
    pub fn admit(&self) -> Option<UnservedSlot> {
        use std::sync::atomic::Ordering;
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < UNSERVED_ALLOWANCE).then_some(n + 1)).ok()?;
        Some(UnservedSlot(self.0.clone()))
    }
}

impl Drop for UnservedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A TCP stream that can move to another runtime's reactor after the TLS
/// handshake ([`LaneTcp::rehome`]) and, for kernel TLS, hand its reader at
/// most one TLS record per read ([`LaneTcp::bound_reads_to_records`]);
/// otherwise a plain `TcpStream`.
pub struct LaneTcp(Option<TcpStream>, Option<RecordCursor>);

/// Where a bounded reader is in the stream of TLS records: inside a 5-byte
/// header (`have` bytes of it read) or inside a payload (`payload_left`
/// bytes to go).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordCursor {
    header: [u8; 5],
    have: usize,
    payload_left: usize,
}

impl RecordCursor {
    /// The most the next read may take without crossing into the next
    /// header or record.
    fn limit(&self) -> usize {
        if self.payload_left > 0 { self.payload_left } else { 5 - self.have }
    }

    /// Follows `bytes`, read under [`RecordCursor::limit`].
    fn advance(&mut self, bytes: &[u8]) {
        if self.payload_left > 0 {
            self.payload_left -= bytes.len();
            return;
        }
        self.header[self.have..self.have + bytes.len()].copy_from_slice(bytes);
        self.have += bytes.len();
        if self.have == 5 {
            self.have = 0;
            self.payload_left = u16::from_be_bytes([self.header[3], self.header[4]]).into();
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }
}

impl LaneTcp {
    pub fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp), None)
    }

    /// From now on each read ends at the end of a TLS record (header and
    /// payload read apart): whatever reads this stream — rustls during the
    /// handshake — never holds part of a record the kernel would need.
    pub fn bound_reads_to_records(mut self) -> Self {
        self.1 = Some(RecordCursor::default());
        self
    }

    /// Whether the bytes read so far end at a record boundary (always true
    /// when reads are not bounded).
    pub fn at_record_boundary(&self) -> bool {
        self.1.as_ref().is_none_or(RecordCursor::at_boundary)
    }

    pub fn stop_bounding_reads(&mut self) {
        self.1 = None;
    }

    /// Runs a non-blocking socket call under the reactor's readiness (see
    /// [`TcpStream::try_io`]).
    pub fn try_io<R>(&self, interest: tokio::io::Interest, f: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
        self.0.as_ref().expect("present until dropped").try_io(interest, f)
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.as_ref().expect("present until dropped").poll_write_ready(cx)
    }

    /// Re-registers the socket with `runtime`'s reactor, so the lane's own
    /// threads wait on it. No data is lost: the kernel keeps what arrived,
    /// and TLS state lives in the surrounding stream.
    pub fn rehome(&mut self, runtime: &Handle) -> std::io::Result<()> {
        let std = self.0.take().expect("present until dropped").into_std()?;
        let _entered = runtime.enter();
        self.0 = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    fn tcp(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(self.get_mut().0.as_mut().expect("present until dropped"))
    }

    /// The socket, for the lingering close.
    pub fn into_inner(self) -> TcpStream {
        self.0.expect("present until dropped")
    }
}

impl std::os::fd::AsRawFd for LaneTcp {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_ref().expect("present until dropped").as_raw_fd()
    }
}

impl AsyncRead for LaneTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let tcp = Pin::new(this.0.as_mut().expect("present until dropped"));
        let Some(cursor) = this.1.as_mut() else { return tcp.poll_read(cx, buf) };
        let mut bounded = buf.take(cursor.limit());
        std::task::ready!(tcp.poll_read(cx, &mut bounded))?;
        let n = bounded.filled().len();
        cursor.advance(bounded.filled());
        // SAFETY: the `n` bytes were just filled, through `bounded`, in the
        // part of `buf` that follows its filled bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LaneTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.tcp().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_shutdown(cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        self.tcp().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    /// A lane server that reports each connection (a number) it receives
    /// together with the name of the thread that received it.
    fn recording(seen: mpsc::UnboundedSender<(u32, String)>) -> ServeLane<u32> {
        Arc::new(move |mut incoming: mpsc::Receiver<u32>| {
            let seen = seen.clone();
            Box::pin(async move {
                while let Some(c) = incoming.recv().await {
                    let _ = seen.send((c, std::thread::current().name().unwrap_or("").to_string()));
                }
            })
        })
    }

    #[tokio::test]
    async fn each_tenant_gets_its_own_lane_up_to_the_cap_then_shares_one() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let lanes = IoLanes::new(1, 3, recording(tx));
        let mut thread_of = HashMap::new();
        for (i, who) in [Some("a"), Some("b"), Some("c"), None, Some("a"), Some("d")].into_iter().enumerate() {
            let t = who.map(tenant);
            let lane = lanes.lane(t.as_ref()).unwrap().unwrap();
            lane.connections.send(i as u32).await.unwrap();
            let (c, thread) = rx.recv().await.unwrap();
            assert_eq!(c, i as u32);
            thread_of.insert(i, thread);
        }
        // a and b have lanes of their own; the third lane is the shared
        // one, used by c, d (past the cap of 3) and the identity-less.
        assert_eq!(lanes.len(), 3);
        assert_eq!(thread_of[&0], thread_of[&4], "a's connections share a's lane");
        assert_ne!(thread_of[&0], thread_of[&1], "a and b are apart");
        assert_eq!(thread_of[&2], thread_of[&3]);
        assert_eq!(thread_of[&2], thread_of[&5]);
        assert_ne!(thread_of[&2], thread_of[&0]);
        assert!(thread_of.values().all(|t| t.starts_with("imgsvc-io-")), "{thread_of:?}");

        // Closing ends every lane's server and refuses new connections.
        for served in lanes.close() {
            served.await.unwrap();
        }
        assert!(lanes.lane(Some(&tenant("a"))).unwrap().is_none());
    }

    /// Reads `records` (sent in awkward pieces) through a bounded LaneTcp
    /// with a large buffer: no read may cross a record's end, and the
    /// reader knows when it stands at one.
    #[tokio::test]
    async fn bounded_reads_end_at_every_record_boundary() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut records = Vec::new();
        let mut ends = Vec::new();
        for (i, len) in [0usize, 1, 300, 16_401, 5, 70_000 % 65_536].into_iter().enumerate() {
            records.extend_from_slice(&[23, 3, 3]);
            records.extend_from_slice(&(len as u16).to_be_bytes());
            records.extend((0..len).map(|j| (i * 7 + j) as u8));
            ends.push(records.len());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sent = records.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7_777) {
                client.write_all(piece).await.unwrap();
            }
            client
        });
        let mut tcp = LaneTcp::new(accepted).bound_reads_to_records();
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 1 << 20]);
        while got.len() < records.len() {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0);
            let (start, end) = (got.len(), got.len() + n);
            got.extend_from_slice(&buf[..n]);
            // Never across a header's end or a record's end.
            let header_ends = std::iter::once(5).chain(ends.iter().map(|e| e + 5));
            for boundary in ends.iter().copied().chain(header_ends) {
                assert!(!(start < boundary && boundary < end), "read {start}..{end} crosses {boundary}");
            }
            assert_eq!(tcp.at_record_boundary(), ends.contains(&end) || end == 0, "at {end}");
        }
        assert_eq!(got, records);
        tcp.stop_bounding_reads();
        assert!(tcp.at_record_boundary());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn one_lane_means_all_connections_share_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let lanes = IoLanes::new(2, 1, recording(tx));
        for (i, who) in ["a", "b"].into_iter().enumerate() {
            lanes.lane(Some(&tenant(who))).unwrap().unwrap().connections.send(i as u32).await.unwrap();
            rx.recv().await.unwrap();
        }
        assert_eq!(lanes.len(), 1);
    }

    #[tokio::test]
    async fn a_rehomed_socket_keeps_its_data_and_serves_on_the_new_runtime() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        // Bytes already waiting in the kernel before the move are read after it.
        client.write_all(b"before").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let other = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut tcp = LaneTcp::new(accepted);
        tcp.rehome(other.handle()).unwrap();
        let echoed = other.spawn(async move {
            let mut buf = [0u8; 11];
            tcp.read_exact(&mut buf).await.unwrap();
            tcp.write_all(&buf).await.unwrap();
            buf
        });
        client.write_all(b"after").await.unwrap();
        let mut back = [0u8; 11];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"beforeafter");
        assert_eq!(&echoed.await.unwrap(), b"beforeafter");
        other.shutdown_background();
    }
}
