//! `ThrottleProxy`: a TCP forwarder that counts (and optionally rate-limits) the bytes an
//! upstream sends to its clients. Put it in front of the origin to measure origin egress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 16 * 1024;

struct Shared {
    upstream: String,
    bytes_down: Arc<AtomicU64>,
    bytes_up: AtomicU64,
    connections: AtomicU64,
    /// Bytes per second from upstream to clients, all connections together; 0 = unlimited.
    rate: AtomicU64,
    /// The time at which the shared link is free again (pacing of the rate limit).
    next_free: Mutex<Option<Instant>>,
}

impl Shared {
    /// Reserves `n` bytes of the shared link; returns when they may be sent.
    fn reserve(&self, n: usize) -> Option<Instant> {
        let rate = self.rate.load(Ordering::Relaxed);
        let mut next = self.next_free.lock().expect("proxy lock");
        if rate == 0 {
            *next = None;
            return None;
        }
        let now = Instant::now();
        let start = match *next {
            Some(t) if t > now => t,
            _ => now,
        };
        let end = start + Duration::from_secs_f64(n as f64 / rate as f64);
        *next = Some(end);
        Some(end)
    }
}

/// A running proxy on its own runtime; stops (dropping every connection) on drop.
pub struct ThrottleProxy {
    addr: String,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl ThrottleProxy {
    /// Listens on 127.0.0.1:free port and forwards every connection to `upstream`.
    pub fn start(upstream: &str) -> Result<ThrottleProxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("throttle-proxy")
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding proxy")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?.to_string();
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            bytes_down: Arc::new(AtomicU64::new(0)),
            bytes_up: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            next_free: Mutex::new(None),
        });
        let s = shared.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(client, s).await;
                });
            }
        });
        Ok(ThrottleProxy {
            addr,
            shared,
            rt: Some(rt),
        })
    }

    /// `127.0.0.1:PORT` of the proxy (use it as the upstream name).
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Total bytes sent from upstream to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// The counter itself, to read from elsewhere.
    pub fn bytes_down_counter(&self) -> Arc<AtomicU64> {
        self.shared.bytes_down.clone()
    }

    /// Total bytes sent from clients to upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Limits upstream→client bytes per second over all connections (`None`: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(mut client: TcpStream, s: Arc<Shared>) -> Result<()> {
    let mut upstream = TcpStream::connect(&s.upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                uw.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            uw.write_all(&buf[..n]).await?;
            s.bytes_up.fetch_add(n as u64, Ordering::SeqCst);
        }
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = ur.read(&mut buf).await?;
            if n == 0 {
                cw.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            if let Some(at) = s.reserve(n) {
                tokio::time::sleep_until(at.into()).await;
            }
            cw.write_all(&buf[..n]).await?;
            s.bytes_down.fetch_add(n as u64, Ordering::SeqCst);
        }
    };
    // Either direction failing ends the connection; a clean half-close lets the other finish.
    tokio::try_join!(up, down)?;
    Ok(())
}
