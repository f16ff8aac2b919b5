//! Helpers for the origin client's tests: small in-process HTTP servers on
//! 127.0.0.1 ephemeral ports that record what they were asked.

#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shoal_registry_shim::client::{ClientConfig, RetryPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Response bodies of the test servers.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A whole body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// No body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response with status, headers and body.
pub fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(body)).unwrap()
}

/// The OCI error JSON body.
pub fn oci_error(code: &str, message: &str) -> String {
    format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#)
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
}

impl Seen {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// The `host:port` the client addressed.
    pub fn host(&self) -> String {
        self.header("host").unwrap()
    }

    /// All values of a query parameter.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    }
}

/// A test server; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Server {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:<port>`, the registry name for the client.
    pub fn registry(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves HTTP/1.1 on 127.0.0.1 with `handler`, recording each request.
pub async fn serve<F, Fut>(handler: F) -> Server
where
    F: Fn(Seen) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let rec = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let rec = rec.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let s = Seen {
                        method: req.method().clone(),
                        path: req.uri().path().to_owned(),
                        query: req.uri().query().unwrap_or_default().to_owned(),
                        headers: req.headers().clone(),
                    };
                    rec.lock().unwrap().push(s.clone());
                    let fut = handler(s);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, seen, task }
}

/// A client config for tests: plain HTTP to 127.0.0.1 and localhost, short
/// delays and timeouts.
pub fn test_config() -> ClientConfig {
    ClientConfig {
        insecure_hosts: HashSet::from(["127.0.0.1".to_owned(), "localhost".to_owned()]),
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(3),
        },
        connect_timeout: Duration::from_secs(3),
        response_timeout: Duration::from_secs(10),
        chunk_idle_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

/// Runs a test body with a time limit, so nothing hangs.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("test took too long")
}

/// Reads a blob stream to the end.
pub async fn read_all(
    s: &mut shoal_registry_shim::client::BlobStream,
) -> Result<Vec<u8>, shoal_registry_shim::client::OriginError> {
    let mut out = Vec::new();
    while let Some(c) = s.next_chunk().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}
