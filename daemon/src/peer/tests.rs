//! Loopback tests of the peer data plane: real quinn endpoints with mutual
//! TLS from test CAs, a real store, and test doubles for misbehaving peers.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shoal_proto::chunk::MIN_CHUNK_SIZE as MIN_CHUNK;
use shoal_proto::wire::{ErrorKind, Request, RequestDecoder, Response, ResponseDecoder, ALPN};
use shoal_proto::{Bitfield, ChunkError, ChunkHashes, ChunkLayout, Digest};
use tokio::time::Instant;

use super::client::{BadPeer, ChunkResult, FetchError, PeerClient};
use super::server::{PeerServer, PeerServerHandle, ServeLimits};
use super::source::{ChunkSource, StoreSource};
use super::{transport_config, PeerAddr};
use crate::metrics::{self, SourceLabel};
use crate::store::{Kind, Store};

// ---------------------------------------------------------------------------
// Certificates and endpoints
// ---------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cluster CA for tests, issuing leaf certificates named by node id.
struct TestCa {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, node_id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![node_id.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        Arc::new(roots)
    }

    /// What `cluster.rs` builds: client certificates of this CA required.
    fn server_config(&self, node_id: &str) -> quinn::ServerConfig {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
                .build()
                .unwrap();
        let (chain, key) = self.leaf(node_id);
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport_config());
        cfg
    }

    /// `trust` as the only root; `node_id`'s certificate from this CA as
    /// client certificate, or none.
    fn client_config(&self, trust: &TestCa, node_id: Option<&str>) -> quinn::ClientConfig {
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(trust.roots());
        let mut tls = match node_id {
            Some(id) => {
                let (chain, key) = self.leaf(id);
                b.with_client_auth_cert(chain, key).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        cfg
    }

    fn server_endpoint(&self, node_id: &str) -> quinn::Endpoint {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        quinn::Endpoint::server(self.server_config(node_id), addr).unwrap()
    }

    /// A client as `node_id` (no certificate for `None`), trusting this CA.
    fn client(&self, node_id: Option<&str>) -> PeerClient {
        self.client_trusting(self, node_id)
    }

    /// A client as `node_id` of this CA, trusting `trust`.
    fn client_trusting(&self, trust: &TestCa, node_id: Option<&str>) -> PeerClient {
        PeerClient::new(self.client_endpoint(trust, node_id))
    }

    fn client_endpoint(&self, trust: &TestCa, node_id: Option<&str>) -> quinn::Endpoint {
        let mut ep = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        ep.set_default_client_config(self.client_config(trust, node_id));
        ep
    }
}

/// Serves `source` as `server-1`, certified by `ca`.
fn serve(
    ca: &TestCa,
    source: Arc<dyn ChunkSource>,
    limits: ServeLimits,
) -> (PeerServerHandle, PeerAddr) {
    let handle = PeerServer::spawn(ca.server_endpoint("server-1"), source, limits);
    let peer = PeerAddr {
        addr: handle.local_addr().unwrap(),
        name: "server-1".into(),
    };
    (handle, peer)
}

/// Every test ends within this bound, passing or failing.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

const SECOND: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Data and sources
// ---------------------------------------------------------------------------

/// 4.5 chunks of [`MIN_CHUNK`] bytes of varied data.
fn blob_data(seed: u8) -> Vec<u8> {
    (0..MIN_CHUNK as usize * 9 / 2)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn layout_of(data: &[u8]) -> ChunkLayout {
    ChunkLayout::new(data.len() as u64, MIN_CHUNK).unwrap()
}

fn hashes_of(data: &[u8]) -> (ChunkHashes, Digest) {
    ChunkHashes::of_blob(layout_of(data), data).unwrap()
}

fn chunk_of(data: &[u8], i: u32) -> &[u8] {
    let (off, len) = layout_of(data).range(i).unwrap();
    &data[off as usize..off as usize + len as usize]
}

/// Blocks each chunk read until the test releases it.
struct Gate {
    entered: tokio::sync::mpsc::UnboundedSender<u32>,
    release: Mutex<mpsc::Receiver<()>>,
}

/// A source over blobs in memory, optionally lying or slow.
#[derive(Default)]
struct MemSource {
    blobs: HashMap<Digest, Bytes>,
    /// Flip a bit of every chunk served.
    corrupt: bool,
    /// Serve chunks one byte short.
    truncate: bool,
    gate: Option<Gate>,
    chunk_calls: AtomicUsize,
}

impl MemSource {
    fn with(data: &[u8]) -> Self {
        let mut s = MemSource::default();
        s.blobs
            .insert(Digest::of(data), Bytes::copy_from_slice(data));
        s
    }
}

impl ChunkSource for MemSource {
    fn layout(&self, blob: &Digest, chunk_size: u32) -> Result<Option<ChunkLayout>, ChunkError> {
        self.blobs
            .get(blob)
            .map(|b| ChunkLayout::new(b.len() as u64, chunk_size))
            .transpose()
    }

    fn chunk(
        &self,
        blob: &Digest,
        layout: ChunkLayout,
        index: u32,
    ) -> std::io::Result<Option<Bytes>> {
        self.chunk_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _ = gate.entered.send(index);
            let _ = gate
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
        let Some(data) = self.blobs.get(blob) else {
            return Ok(None);
        };
        let Some((off, len)) = layout.range(index) else {
            return Ok(None);
        };
        let mut chunk = data.slice(off as usize..(off + u64::from(len)) as usize);
        if self.corrupt {
            let mut v = chunk.to_vec();
            v[len as usize / 2] ^= 0x10;
            chunk = v.into();
        }
        if self.truncate {
            chunk.truncate(chunk.len() - 1);
        }
        Ok(Some(chunk))
    }

    fn bitfield(&self, blob: &Digest) -> Option<(ChunkLayout, Bitfield)> {
        let layout = ChunkLayout::for_blob(self.blobs.get(blob)?.len() as u64).ok()?;
        Some((layout, Bitfield::full(layout.count()).unwrap()))
    }
}

fn rejected_by_peer() -> u64 {
    metrics::global()
        .chunks_rejected
        .get_or_create(&SourceLabel { source: "peer" })
        .get()
}

// ---------------------------------------------------------------------------
// Raw-stream helpers
// ---------------------------------------------------------------------------

/// Sends `bytes` on a new stream of `conn`, finishes it, and decodes the
/// whole answer.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Vec<Response> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    let mut dec = ResponseDecoder::new();
    let mut input: &[u8] = &answer;
    let mut out = Vec::new();
    loop {
        while let Some(frame) = dec.next_response().unwrap() {
            out.push(frame);
        }
        if input.is_empty() {
            break;
        }
        let n = dec.push(input);
        input = &input[n..];
    }
    dec.finish().unwrap();
    out
}

fn encode_request(r: &Request) -> BytesMut {
    let mut b = BytesMut::new();
    r.encode(&mut b).unwrap();
    b
}

fn error_code(responses: &[Response]) -> Option<ErrorKind> {
    match responses {
        [Response::Error { code, .. }] => Some(*code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fetches_verified_chunks_of_a_stored_blob() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
        let data = blob_data(1);
        let (hashes, digest) = hashes_of(&data);
        store.put_small(&digest, Kind::Blob, &data, None).unwrap();
        let ca = TestCa::new("cluster");
        let (server, peer) = serve(
            &ca,
            Arc::new(StoreSource::new(store.clone())),
            ServeLimits::default(),
        );
        let client = ca.client(Some("client-1"));
        let (sent0, recv0) = (
            metrics::global().peer_bytes_sent.get(),
            metrics::global().peer_bytes_received.get(),
        );

        let all: Vec<u32> = (0..hashes.layout().count()).collect();
        assert_eq!(all.len(), 5);
        let got = client.fetch(&peer, &digest, &hashes, &all, DEADLINE).await;
        assert_eq!(got.len(), 5);
        for (i, r) in &got {
            match r {
                ChunkResult::Verified(b) => assert_eq!(&b[..], chunk_of(&data, *i), "chunk {i}"),
                other => panic!("chunk {i}: {other:?}"),
            }
            assert_eq!(r.outcome(), shoal_proto::sched::Outcome::Verified);
        }
        // Header bytes come on top of the data, both ways.
        assert!(metrics::global().peer_bytes_sent.get() - sent0 >= data.len() as u64);
        assert!(metrics::global().peer_bytes_received.get() - recv0 >= data.len() as u64);

        // A subset, unsorted and with a duplicate: one result per index.
        let got = client
            .fetch(&peer, &digest, &hashes, &[4, 1, 4], DEADLINE)
            .await;
        let idx: Vec<u32> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, [1, 4]);
        assert!(matches!(&got[1].1, ChunkResult::Verified(b) if b.len() == MIN_CHUNK as usize / 2));

        // The bitfield uses the layout every node picks for the blob.
        let own = ChunkLayout::for_blob(data.len() as u64).unwrap();
        let bits = client
            .bitfield(&peer, &digest, own, DEADLINE)
            .await
            .unwrap()
            .unwrap();
        assert!(bits.is_full() && bits.len() == own.count());
        let other = client
            .bitfield(&peer, &digest, hashes.layout(), DEADLINE)
            .await;
        assert!(
            matches!(other, Err(FetchError::LayoutMismatch { .. })),
            "{other:?}"
        );

        // The benchmark entry point: all chunks over parallel streams.
        let stats = client
            .fetch_blob(&peer, &digest, &hashes, 3, 1, DEADLINE)
            .await;
        assert_eq!(stats.verified, 5);
        assert_eq!(stats.verified_bytes, data.len() as u64);
        assert_eq!(stats.bad + stats.dont_have + stats.failed, 0);

        // The connection was reused all along.
        assert_eq!(cached_connections(&client, &peer).await, 1);
        server.shutdown().await;
    })
    .await;
}

/// Connections the client has to `peer` (at most one is cached).
async fn cached_connections(client: &PeerClient, peer: &PeerAddr) -> usize {
    let a = client.connection(peer).await.unwrap();
    let b = client.connection(peer).await.unwrap();
    if a.stable_id() == b.stable_id() {
        1
    } else {
        2
    }
}

#[tokio::test]
async fn a_blob_not_held_is_dont_have() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
        let data = blob_data(2);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(
            &ca,
            Arc::new(StoreSource::new(store.clone())),
            ServeLimits::default(),
        );
        let client = ca.client(Some("client-1"));
        let got = client
            .fetch(&peer, &digest, &hashes, &[0, 2, 3], DEADLINE)
            .await;
        assert_eq!(got.len(), 3);
        for (_, r) in &got {
            assert!(matches!(r, ChunkResult::DontHave), "{r:?}");
        }
        let bits = client
            .bitfield(&peer, &digest, hashes.layout(), DEADLINE)
            .await
            .unwrap();
        assert!(bits.is_none());

        // A partial (not yet verified) blob is not served either.
        let (file, _) = store
            .begin_partial(&digest, Kind::Blob, hashes.layout())
            .unwrap();
        std::io::Write::write_all(&mut &file, &data).unwrap();
        let got = client.fetch(&peer, &digest, &hashes, &[0], DEADLINE).await;
        assert!(matches!(got[..], [(0, ChunkResult::DontHave)]), "{got:?}");
    })
    .await;
}

#[tokio::test]
async fn corrupt_or_short_chunks_are_bad() {
    bounded(async {
        let data = blob_data(3);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let client = ca.client(Some("client-1"));

        let before = rejected_by_peer();
        let source = MemSource {
            corrupt: true,
            ..MemSource::with(&data)
        };
        let (_s1, peer) = serve(&ca, Arc::new(source), ServeLimits::default());
        let got = client
            .fetch(&peer, &digest, &hashes, &[0, 4], DEADLINE)
            .await;
        for (_, r) in &got {
            assert!(
                matches!(
                    r,
                    ChunkResult::Bad(BadPeer::Verify(ChunkError::Mismatch { .. }))
                ),
                "{r:?}"
            );
            assert_eq!(r.outcome(), shoal_proto::sched::Outcome::Bad);
        }
        assert!(rejected_by_peer() >= before + 2);

        let before = rejected_by_peer();
        let source = MemSource {
            truncate: true,
            ..MemSource::with(&data)
        };
        let (_s2, peer) = serve(&ca, Arc::new(source), ServeLimits::default());
        let got = client.fetch(&peer, &digest, &hashes, &[1], DEADLINE).await;
        assert!(
            matches!(
                &got[..],
                [(
                    1,
                    ChunkResult::Bad(BadPeer::Verify(ChunkError::BadLength { .. }))
                )]
            ),
            "{got:?}"
        );
        assert!(rejected_by_peer() > before);
    })
    .await;
}

/// Whether the connection was closed by a TLS alert. In TLS 1.3 the client
/// may finish its side of the handshake first; the server's certificate
/// check then closes the connection, so the error can surface on any step.
fn refused_by_tls(e: &FetchError) -> bool {
    let lost = match e {
        FetchError::Connection(c) => c,
        FetchError::Read(quinn::ReadError::ConnectionLost(c)) => c,
        FetchError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return false,
    };
    let code = match lost {
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        quinn::ConnectionError::TransportError(t) => t.code,
        _ => return false,
    };
    // QUIC carries TLS alerts as codes 0x100..=0x1ff.
    (0x100..0x200).contains(&u64::from(code))
}

#[tokio::test]
async fn denied_members_get_nothing_until_taken_off_the_list() {
    bounded(async {
        let data = blob_data(4);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let source = Arc::new(MemSource::with(&data));
        let denied = Arc::new(super::DenyList::default());
        let limits = ServeLimits {
            denied: denied.clone(),
            ..ServeLimits::default()
        };
        let (_server, peer) = serve(&ca, source.clone(), limits);
        let (alice, mallory) = (ca.client(Some("alice")), ca.client(Some("mallory")));
        let verified = |got: &[(u32, ChunkResult)]| matches!(got, [(0, ChunkResult::Verified(_))]);
        // Mallory is connected and served before the operator denies her.
        let got = mallory.fetch(&peer, &digest, &hashes, &[0], DEADLINE).await;
        assert!(verified(&got), "{got:?}");
        let refused_before = metrics::global().denied_refusals.get();
        assert!(denied.set(["mallory"]));
        assert!(!denied.set(["mallory"]), "the same list is no change");
        // Her open connection is cut at her next stream, new ones refused.
        for _ in 0..2 {
            let got = mallory.fetch(&peer, &digest, &hashes, &[1], DEADLINE).await;
            assert!(matches!(got[..], [(1, ChunkResult::Failed(_))]), "{got:?}");
        }
        assert!(metrics::global().denied_refusals.get() > refused_before);
        // Others are served as before.
        let got = alice.fetch(&peer, &digest, &hashes, &[0], DEADLINE).await;
        assert!(verified(&got), "{got:?}");
        // Taken off the list, she is a member again.
        assert!(denied.set(Vec::<String>::new()));
        let got = mallory.fetch(&peer, &digest, &hashes, &[0], DEADLINE).await;
        assert!(verified(&got), "{got:?}");
    })
    .await;
}

#[tokio::test]
async fn outsiders_get_nothing() {
    bounded(async {
        let data = blob_data(4);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let source = Arc::new(MemSource::with(&data));
        let (_server, peer) = serve(&ca, source.clone(), ServeLimits::default());

        // A member gets the data: the setup is right.
        let member = ca.client(Some("client-1"));
        let got = member.fetch(&peer, &digest, &hashes, &[0], DEADLINE).await;
        assert!(
            matches!(got[..], [(0, ChunkResult::Verified(_))]),
            "{got:?}"
        );
        let calls = source.chunk_calls.load(Ordering::SeqCst);

        // A certificate of another CA (trusting ours, so the client side of
        // the handshake is content).
        let outsider = TestCa::new("other cluster").client_trusting(&ca, Some("client-x"));
        // No certificate at all.
        let anonymous = ca.client(None);

        for (who, client) in [("other CA", &outsider), ("no certificate", &anonymous)] {
            let got = client
                .fetch(&peer, &digest, &hashes, &[0, 1], DEADLINE)
                .await;
            for (_, r) in &got {
                assert!(
                    matches!(r, ChunkResult::Failed(e) if refused_by_tls(e)),
                    "{who}: {r:?}"
                );
            }
            let bits = client
                .bitfield(&peer, &digest, hashes.layout(), DEADLINE)
                .await;
            assert!(bits.is_err(), "{who}: {bits:?}");
        }
        assert_eq!(source.chunk_calls.load(Ordering::SeqCst), calls);
    })
    .await;
}

#[tokio::test]
async fn garbage_gets_an_error_and_the_server_keeps_serving() {
    bounded(async {
        let data = blob_data(5);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(
            &ca,
            Arc::new(MemSource::with(&data)),
            ServeLimits::default(),
        );
        let client = ca.client(Some("client-1"));
        let conn = client.connection(&peer).await.unwrap();

        let blob_hex = hex::encode(digest.as_bytes());
        let past_end = encode_request(&Request::GetChunks {
            blob: digest,
            chunk_size: MIN_CHUNK,
            indices: vec![3, 5],
        });
        let well_formed = encode_request(&Request::GetChunks {
            blob: digest,
            chunk_size: MIN_CHUNK,
            indices: vec![0],
        });
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("random bytes", b"\xde\xad\xbe\xef garbage".to_vec()),
            ("unknown tag", vec![0x07, 0, 0, 0, 0]),
            ("a response tag", vec![0x41, 0, 0, 0, 4, 0, 0, 0, 1]),
            ("oversize header", vec![0x01, 0xff, 0xff, 0xff, 0xff]),
            (
                "truncated request",
                hex::decode(format!("0100000028{blob_hex}")).unwrap(),
            ),
            ("empty stream", vec![]),
            ("index past the end", past_end.to_vec()),
        ];
        for (what, bytes) in cases {
            let answer = raw_exchange(&conn, &bytes).await;
            assert_eq!(
                error_code(&answer),
                Some(ErrorKind::BadRequest),
                "{what}: {answer:?}"
            );
        }
        // A well-formed raw request on the same connection still works.
        let answer = raw_exchange(&conn, &well_formed).await;
        assert!(
            matches!(&answer[..], [Response::Chunk { index: 0, .. }]),
            "{answer:?}"
        );
        let got = client.fetch(&peer, &digest, &hashes, &[2], DEADLINE).await;
        assert!(
            matches!(got[..], [(2, ChunkResult::Verified(_))]),
            "{got:?}"
        );
        assert!(conn.close_reason().is_none());
    })
    .await;
}

#[tokio::test]
async fn a_silent_request_times_out_on_the_server() {
    bounded(async {
        let ca = TestCa::new("cluster");
        let limits = ServeLimits {
            request_timeout: Duration::from_millis(200),
            ..ServeLimits::default()
        };
        let (_server, peer) = serve(&ca, Arc::new(MemSource::default()), limits);
        let client = ca.client(Some("client-1"));
        let conn = client.connection(&peer).await.unwrap();
        // Half a header, and the stream stays open.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0x01, 0x00]).await.unwrap();
        let answer = recv.read_to_end(4096).await.unwrap();
        let mut dec = ResponseDecoder::new();
        assert_eq!(dec.push(&answer), answer.len());
        assert!(matches!(
            dec.next_response().unwrap(),
            Some(Response::Error {
                code: ErrorKind::BadRequest,
                ..
            })
        ));
    })
    .await;
}

#[tokio::test]
async fn busy_when_upload_slots_are_taken() {
    bounded(async {
        let data = blob_data(6);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let client = ca.client(Some("client-1"));

        // No slots at all (and no queue): every chunk request is refused at
        // once.
        let limits = ServeLimits {
            max_concurrent_uploads: 0,
            upload_queue: 0,
            ..ServeLimits::default()
        };
        let (_s0, peer0) = serve(&ca, Arc::new(MemSource::with(&data)), limits);
        let started = Instant::now();
        let got = client
            .fetch(&peer0, &digest, &hashes, &[0, 1], DEADLINE)
            .await;
        for (_, r) in &got {
            assert!(
                matches!(r, ChunkResult::Failed(FetchError::Busy(_))),
                "{r:?}"
            );
        }
        assert!(started.elapsed() < 5 * SECOND);
        // Bitfield requests take no upload slot.
        let own = ChunkLayout::for_blob(data.len() as u64).unwrap();
        assert!(client
            .bitfield(&peer0, &digest, own, DEADLINE)
            .await
            .unwrap()
            .is_some());

        // One slot, held by a request whose read is stalled.
        let (_s1, peer, mut entered, release) = gated(&ca, &data, 0);
        let first = client.fetch(&peer, &digest, &hashes, &[0], DEADLINE);
        let second = async {
            // The first request holds the slot once its read started.
            assert_eq!(entered.recv().await, Some(0));
            let got = client.fetch(&peer, &digest, &hashes, &[1], DEADLINE).await;
            release.send(()).unwrap();
            got
        };
        let (first, second) = tokio::join!(first, second);
        assert!(
            matches!(first[..], [(0, ChunkResult::Verified(_))]),
            "{first:?}"
        );
        assert!(
            matches!(second[..], [(1, ChunkResult::Failed(FetchError::Busy(_)))]),
            "{second:?}"
        );
        assert_eq!(second[0].1.outcome(), shoal_proto::sched::Outcome::Busy);
        // It says when to come back: no request timed yet, so one slot's
        // turn is the default hold time, 50 ms.
        assert_eq!(second[0].1.retry_ms(), Some(50), "{second:?}");
        // The slot is free again.
        let again = async {
            let got = client.fetch(&peer, &digest, &hashes, &[1], DEADLINE);
            let unblock = async {
                assert_eq!(entered.recv().await, Some(1));
                release.send(()).unwrap();
            };
            tokio::join!(got, unblock).0
        };
        let got = again.await;
        assert!(
            matches!(got[..], [(1, ChunkResult::Verified(_))]),
            "{got:?}"
        );
    })
    .await;
}

/// A server of `data` with one upload slot and `queue` places in its
/// queue, each chunk read held until the test releases it: the index of
/// each read that started comes out of the receiver.
fn gated(
    ca: &TestCa,
    data: &[u8],
    queue: usize,
) -> (
    PeerServerHandle,
    PeerAddr,
    tokio::sync::mpsc::UnboundedReceiver<u32>,
    mpsc::Sender<()>,
) {
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = mpsc::channel();
    let source = MemSource {
        gate: Some(Gate {
            entered: entered_tx,
            release: Mutex::new(release_rx),
        }),
        ..MemSource::with(data)
    };
    let limits = ServeLimits {
        max_concurrent_uploads: 1,
        upload_queue: queue,
        ..ServeLimits::default()
    };
    let (server, peer) = serve(ca, Arc::new(source), limits);
    (server, peer, entered, release)
}

#[tokio::test]
async fn with_every_slot_taken_requests_queue_for_one_until_the_queue_is_full() {
    bounded(async {
        let data = blob_data(16);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let client = ca.client(Some("client-1"));
        let (_server, peer, mut entered, release) = gated(&ca, &data, 1);
        let first = client.fetch(&peer, &digest, &hashes, &[0], DEADLINE);
        let rest = async {
            // The first request holds the slot; the second waits for it.
            assert_eq!(entered.recv().await, Some(0));
            let queued = client.fetch(&peer, &digest, &hashes, &[1], DEADLINE);
            let then = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                // The queue is full: a third is refused at once.
                let started = Instant::now();
                let third = client.fetch(&peer, &digest, &hashes, &[2], DEADLINE).await;
                assert!(started.elapsed() < SECOND);
                // The slot passes to the waiting request when it frees.
                release.send(()).unwrap();
                assert_eq!(entered.recv().await, Some(1));
                release.send(()).unwrap();
                third
            };
            tokio::join!(queued, then)
        };
        let (first, (queued, third)) = tokio::join!(first, rest);
        assert!(
            matches!(first[..], [(0, ChunkResult::Verified(_))]),
            "{first:?}"
        );
        assert!(
            matches!(queued[..], [(1, ChunkResult::Verified(_))]),
            "{queued:?}"
        );
        assert!(
            matches!(third[..], [(2, ChunkResult::Failed(FetchError::Busy(_)))]),
            "{third:?}"
        );
    })
    .await;
}

/// A raw quinn server that completes handshakes and accepts streams, then
/// hands each stream with its request to `answer`.
fn raw_server<F, Fut>(ca: &TestCa, answer: F) -> (PeerAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(quinn::SendStream, Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ep = ca.server_endpoint("server-1");
    let peer = PeerAddr {
        addr: ep.local_addr().unwrap(),
        name: "server-1".into(),
    };
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let answer = answer.clone();
            held.push(tokio::spawn(async move {
                while let Ok((send, mut recv)) = conn.accept_bi().await {
                    let mut dec = RequestDecoder::new();
                    let bytes = recv.read_to_end(4096).await.unwrap();
                    assert_eq!(dec.push(&bytes), bytes.len());
                    let req = dec.next_request().unwrap().unwrap();
                    tokio::spawn(answer(send, req));
                }
            }));
        }
    });
    (peer, task)
}

#[tokio::test]
async fn a_peer_that_never_answers_fails_within_the_deadline() {
    bounded(async {
        let data = blob_data(7);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (peer, server) = raw_server(&ca, |send, _req| async move {
            // Hold the stream open, say nothing.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(send);
        });
        let client = ca.client(Some("client-1"));
        let deadline = Duration::from_millis(500);
        let started = Instant::now();
        let indices: Vec<u32> = (0..5).collect();
        let got = client
            .fetch(&peer, &digest, &hashes, &indices, deadline)
            .await;
        let took = started.elapsed();
        assert_eq!(got.len(), 5);
        for (_, r) in &got {
            assert!(
                matches!(r, ChunkResult::Failed(FetchError::Timeout)),
                "{r:?}"
            );
        }
        assert!(
            took >= deadline && took < deadline + SECOND,
            "took {took:?}"
        );

        let started = Instant::now();
        let bits = client
            .bitfield(&peer, &digest, hashes.layout(), deadline)
            .await;
        assert!(matches!(bits, Err(FetchError::Timeout)), "{bits:?}");
        assert!(started.elapsed() < deadline + 3 * SECOND);
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn answers_out_of_order_or_unasked_are_protocol_violations() {
    bounded(async {
        let data = Bytes::from(blob_data(8));
        let (hashes, digest) = hashes_of(&data);
        let d2 = data.clone();
        // Answers the first chunk asked correctly, then chunk 3 where the
        // second was due.
        let ca = TestCa::new("cluster");
        let (peer, server) = raw_server(&ca, move |mut send, req| {
            let data = d2.clone();
            async move {
                let Request::GetChunks { indices, .. } = req else {
                    return;
                };
                let mut out = BytesMut::new();
                let layout = layout_of(&data);
                for (n, i) in [indices[0], 3].into_iter().enumerate() {
                    if n == 1 && indices.len() == 1 {
                        break;
                    }
                    let (off, len) = layout.range(i).unwrap();
                    Response::Chunk {
                        index: i,
                        data: data.slice(off as usize..(off + u64::from(len)) as usize),
                    }
                    .encode(&mut out)
                    .unwrap();
                }
                let _ = send.write_all(&out).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        });
        let client = ca.client(Some("client-1"));
        let got = client
            .fetch(&peer, &digest, &hashes, &[0, 1, 2], DEADLINE)
            .await;
        assert!(matches!(got[0], (0, ChunkResult::Verified(_))), "{got:?}");
        for (_, r) in &got[1..] {
            assert!(matches!(r, ChunkResult::Bad(BadPeer::Protocol(_))), "{r:?}");
        }
        // One chunk asked, one answered, then the stream ends: complete.
        let got = client.fetch(&peer, &digest, &hashes, &[2], DEADLINE).await;
        assert!(
            matches!(got[..], [(2, ChunkResult::Verified(_))]),
            "{got:?}"
        );
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn an_answer_that_ends_early_is_a_protocol_violation() {
    bounded(async {
        let data = blob_data(9);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (peer, server) = raw_server(&ca, |mut send, _| async move {
            let mut out = BytesMut::new();
            Response::DontHave { index: 0 }.encode(&mut out).unwrap();
            let _ = send.write_all(&out).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        });
        let client = ca.client(Some("client-1"));
        let got = client
            .fetch(&peer, &digest, &hashes, &[0, 1], DEADLINE)
            .await;
        assert!(matches!(got[0], (0, ChunkResult::DontHave)), "{got:?}");
        assert!(
            matches!(got[1], (1, ChunkResult::Bad(BadPeer::Protocol(_)))),
            "{got:?}"
        );
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn chunks_without_a_known_hash_are_not_requested() {
    bounded(async {
        let data = blob_data(10);
        let (full, digest) = hashes_of(&data);
        let mut hashes = ChunkHashes::new(full.layout());
        hashes.set(1, full.get(1).unwrap()).unwrap();
        let ca = TestCa::new("cluster");
        let source = Arc::new(MemSource::with(&data));
        let (_server, peer) = serve(&ca, source.clone(), ServeLimits::default());
        let client = ca.client(Some("client-1"));
        let got = client
            .fetch(&peer, &digest, &hashes, &[0, 1, 9], DEADLINE)
            .await;
        assert!(
            matches!(got[0], (0, ChunkResult::Failed(FetchError::NoHash))),
            "{got:?}"
        );
        assert!(matches!(got[1], (1, ChunkResult::Verified(_))), "{got:?}");
        assert!(
            matches!(
                got[2],
                (9, ChunkResult::Failed(FetchError::NoSuchChunk { .. }))
            ),
            "{got:?}"
        );
        assert_eq!(source.chunk_calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn a_dead_connection_is_redialled() {
    bounded(async {
        let data = blob_data(11);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(
            &ca,
            Arc::new(MemSource::with(&data)),
            ServeLimits::default(),
        );
        let client = ca.client(Some("client-1"));
        let first = client.connection(&peer).await.unwrap();
        first.close(0u32.into(), b"test");
        let got = client.fetch(&peer, &digest, &hashes, &[3], DEADLINE).await;
        assert!(
            matches!(got[..], [(3, ChunkResult::Verified(_))]),
            "{got:?}"
        );
        let second = client.connection(&peer).await.unwrap();
        assert_ne!(first.stable_id(), second.stable_id());
    })
    .await;
}

#[tokio::test]
async fn shutdown_drains_then_refuses_new_connections() {
    bounded(async {
        let data = blob_data(12);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = mpsc::channel();
        let source = MemSource {
            gate: Some(Gate {
                entered: entered_tx,
                release: Mutex::new(release_rx),
            }),
            ..MemSource::with(&data)
        };
        let (server, peer) = serve(&ca, Arc::new(source), ServeLimits::default());
        let client = ca.client(Some("client-1"));
        // A request in flight when shutdown starts still completes.
        let in_flight = client.fetch(&peer, &digest, &hashes, &[0], DEADLINE);
        let stop = async {
            assert_eq!(entered.recv().await, Some(0));
            let shutdown = server.shutdown();
            tokio::pin!(shutdown);
            // Not done while the request is in flight.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut shutdown)
                    .await
                    .is_err()
            );
            release.send(()).unwrap();
            shutdown.await;
        };
        let (got, ()) = tokio::join!(in_flight, stop);
        assert!(
            matches!(got[..], [(0, ChunkResult::Verified(_))]),
            "{got:?}"
        );

        // Afterwards nobody new gets in.
        let late = ca.client(Some("client-2"));
        let got = late
            .fetch(&peer, &digest, &hashes, &[1], Duration::from_millis(500))
            .await;
        assert!(matches!(got[..], [(1, ChunkResult::Failed(_))]), "{got:?}");
    })
    .await;
}

#[tokio::test]
async fn client_futures_can_be_spawned() {
    fn send<T: Send + 'static>(_: &T) {}
    let client = Arc::new(TestCa::new("cluster").client(Some("client-1")));
    let data = blob_data(13);
    let (hashes, digest) = hashes_of(&data);
    let peer = PeerAddr {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 9)),
        name: "nobody".into(),
    };
    let fetch = {
        let (client, peer, hashes) = (client.clone(), peer.clone(), hashes.clone());
        async move {
            client.fetch(&peer, &digest, &hashes, &[0], SECOND).await;
            client
                .bitfield(&peer, &digest, hashes.layout(), SECOND)
                .await
                .ok();
            client
                .fetch_blob(&peer, &digest, &hashes, 2, 2, SECOND)
                .await;
        }
    };
    send(&fetch);
}

#[test]
fn results_map_onto_scheduler_outcomes() {
    use shoal_proto::sched::Outcome;
    assert_eq!(
        ChunkResult::Verified(Bytes::new()).outcome(),
        Outcome::Verified
    );
    assert_eq!(
        ChunkResult::Bad(BadPeer::Protocol("x".into())).outcome(),
        Outcome::Bad
    );
    assert_eq!(ChunkResult::DontHave.outcome(), Outcome::DontHave);
    assert_eq!(
        ChunkResult::Failed(FetchError::Timeout).outcome(),
        Outcome::Failed
    );
}

/// Fetches all 4.5 chunks of [`blob_data`] through a cap of [`RATE`] bytes a
/// second, upload (`upload`) or download, and checks it took at least the
/// time the cap allows: the bucket's burst (64 KiB) is free, and a download
/// cap waits for the last chunk's bytes after they are delivered, so four
/// chunks less one burst must wait (an upload cap pays before each 16 KiB
/// piece is written, which is stricter still).
const RATE: u64 = 256_000;
async fn fetch_capped(upload: bool) {
    let data = blob_data(if upload { 11 } else { 12 });
    let (hashes, digest) = hashes_of(&data);
    let ca = TestCa::new("cluster");
    let cap = || crate::rate::RateLimit::new(RATE);
    let limits = ServeLimits {
        upload_rate: if upload {
            cap()
        } else {
            crate::rate::RateLimit::unlimited()
        },
        ..ServeLimits::default()
    };
    let (_server, peer) = serve(&ca, Arc::new(MemSource::with(&data)), limits);
    let endpoint = ca.client_endpoint(&ca, Some("client-1"));
    let client = if upload {
        PeerClient::new(endpoint)
    } else {
        PeerClient::with_download_rate(endpoint, cap())
    };
    client.connection(&peer).await.unwrap();
    let started = Instant::now();
    let got = client
        .fetch(&peer, &digest, &hashes, &[0, 1, 2, 3, 4], DEADLINE)
        .await;
    let took = started.elapsed();
    assert!(
        got.iter()
            .all(|(_, r)| matches!(r, ChunkResult::Verified(_))),
        "{got:?}"
    );
    let at_least =
        Duration::from_secs_f64((4 * MIN_CHUNK as u64 - (64 << 10)) as f64 / RATE as f64);
    assert!(took >= at_least, "{took:?}");
}

#[tokio::test]
async fn the_upload_cap_holds_a_peer_to_the_rate() {
    bounded(fetch_capped(true)).await;
}

#[tokio::test]
async fn the_download_cap_holds_a_client_to_the_rate() {
    bounded(fetch_capped(false)).await;
}

#[tokio::test]
async fn a_slow_answer_reports_its_bytes_moving() {
    bounded(async {
        let data = blob_data(13);
        let (hashes, digest) = hashes_of(&data);
        let ca = TestCa::new("cluster");
        let limits = ServeLimits {
            upload_rate: crate::rate::RateLimit::new(RATE),
            ..ServeLimits::default()
        };
        let (_server, peer) = serve(&ca, Arc::new(MemSource::with(&data)), limits);
        let client = ca.client(Some("client-1"));
        client.connection(&peer).await.unwrap();
        let log: std::sync::Mutex<Vec<(Instant, u32, bool)>> = Default::default();
        client
            .fetch_each(
                &peer,
                &digest,
                &hashes,
                &[0, 1, 2, 3],
                DEADLINE,
                |i, r| {
                    assert!(matches!(r, ChunkResult::Verified(_)), "{r:?}");
                    log.lock().unwrap().push((Instant::now(), i, true));
                },
                |i| log.lock().unwrap().push((Instant::now(), i, false)),
            )
            .await;
        let log = log.into_inner().unwrap();
        // Four chunks less the bucket's burst take about a second at the
        // cap: the bytes moving are told several times, never more often
        // than PROGRESS_MS, and always of the chunk being received.
        let moving: Vec<&(Instant, u32, bool)> = log.iter().filter(|e| !e.2).collect();
        assert!(moving.len() >= 2, "{log:?}");
        let every = Duration::from_millis(shoal_proto::sched::PROGRESS_MS);
        for w in moving.windows(2) {
            assert!(w[1].0 - w[0].0 >= every, "{log:?}");
        }
        let mut done = 0;
        for &(_, i, result) in &log {
            if result {
                assert_eq!(i, done);
                done += 1;
            } else {
                assert_eq!(i, done, "progress of a chunk not being received: {log:?}");
            }
        }
        assert_eq!(done, 4);
    })
    .await;
}

/// A blob arriving chunk by chunk at the test's command, as a transfer
/// stores it.
struct Arriving {
    blob: Digest,
    layout: ChunkLayout,
    progress: tokio::sync::watch::Sender<crate::transfer::Progress>,
}

impl Arriving {
    fn new(data: &[u8]) -> Arc<Self> {
        let layout = layout_of(data);
        let (progress, _) = tokio::sync::watch::channel(crate::transfer::Progress {
            phase: crate::transfer::Phase::Running,
            size: layout.size(),
            written: 0,
            file: None,
            layout: Some(layout),
            have: Some(Bitfield::for_layout(&layout)),
            confirmed: true,
        });
        Arc::new(Arriving {
            blob: Digest::of(data),
            layout,
            progress,
        })
    }

    fn store(&self, chunks: &[u32]) {
        self.progress.send_modify(|p| {
            let have = p.have.as_mut().unwrap();
            for &c in chunks {
                have.set(c).unwrap();
            }
        });
    }
}

impl ChunkSource for Arriving {
    fn layout(&self, blob: &Digest, _: u32) -> Result<Option<ChunkLayout>, ChunkError> {
        Ok((*blob == self.blob).then_some(self.layout))
    }

    fn chunk(&self, _: &Digest, _: ChunkLayout, _: u32) -> std::io::Result<Option<Bytes>> {
        Ok(None)
    }

    fn bitfield(&self, blob: &Digest) -> Option<(ChunkLayout, Bitfield)> {
        let p = self.progress.borrow();
        (*blob == self.blob).then(|| (self.layout, p.have.clone().unwrap()))
    }

    fn arrivals(
        &self,
        blob: &Digest,
    ) -> Option<tokio::sync::watch::Receiver<crate::transfer::Progress>> {
        (*blob == self.blob).then(|| self.progress.subscribe())
    }
}

#[tokio::test]
async fn a_watch_hears_of_stored_chunks_until_the_blob_is_complete() {
    bounded(async {
        let data = blob_data(21);
        let source = Arriving::new(&data);
        let (blob, layout) = (source.blob, source.layout);
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(&ca, source.clone(), ServeLimits::default());
        let client = Arc::new(ca.client(Some("client-1")));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = {
            let (client, peer) = (client.clone(), peer.clone());
            tokio::spawn(async move {
                client
                    .watch(&peer, &blob, layout, DEADLINE, |bits| {
                        tx.send(bits).unwrap();
                    })
                    .await
            })
        };
        let first = rx.recv().await.unwrap();
        assert_eq!(first.count(), 0, "{first:?}");
        source.store(&[1]);
        let next = rx.recv().await.unwrap();
        assert_eq!(next.iter_ones().collect::<Vec<_>>(), [1]);
        // Chunks stored close together may share a frame; none is lost.
        source.store(&[0]);
        source.store(&[3]);
        let mut seen = rx.recv().await.unwrap();
        while seen.count() < 3 {
            seen = rx.recv().await.unwrap();
        }
        assert_eq!(seen.iter_ones().collect::<Vec<_>>(), [0, 1, 3]);
        source.store(&[2, 4]);
        let last = rx.recv().await.unwrap();
        assert!(last.is_full(), "{last:?}");
        // The full bitfield ends the watch.
        watch.await.unwrap().unwrap();
        assert!(rx.recv().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn a_watch_of_a_complete_blob_is_one_bitfield_and_of_an_unknown_one_none() {
    bounded(async {
        let data = blob_data(22);
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(
            &ca,
            Arc::new(MemSource::with(&data)),
            ServeLimits::default(),
        );
        let client = ca.client(Some("client-1"));
        // `MemSource` lays blobs out with the default chunk size.
        let layout = ChunkLayout::for_blob(data.len() as u64).unwrap();
        let mut got = Vec::new();
        client
            .watch(&peer, &Digest::of(&data), layout, DEADLINE, |b| got.push(b))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_full());

        let other = blob_data(23);
        let mut got = Vec::new();
        client
            .watch(&peer, &Digest::of(&other), layout, DEADLINE, |b| {
                got.push(b)
            })
            .await
            .unwrap();
        assert!(got.is_empty(), "{got:?}");

        // A bitfield laid out otherwise is refused, not believed.
        let err = client
            .watch(
                &peer,
                &Digest::of(&data),
                layout_of(&data),
                DEADLINE,
                |_| panic!("a mismatched layout was passed on"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::LayoutMismatch { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn watchers_past_the_limit_are_told_busy_and_a_closed_watch_frees_its_slot() {
    bounded(async {
        let data = blob_data(24);
        let source = Arriving::new(&data);
        let (blob, layout) = (source.blob, source.layout);
        let ca = TestCa::new("cluster");
        let limits = ServeLimits {
            watchers_per_blob: 1,
            ..ServeLimits::default()
        };
        let (_server, peer) = serve(&ca, source.clone(), limits);
        let client = Arc::new(ca.client(Some("client-1")));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let first = {
            let (client, peer) = (client.clone(), peer.clone());
            tokio::spawn(async move {
                client
                    .watch(&peer, &blob, layout, DEADLINE, |b| tx.send(b).unwrap())
                    .await
            })
        };
        rx.recv().await.unwrap();
        let err = client
            .watch(&peer, &blob, layout, DEADLINE, |_| panic!("over the limit"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Busy(_)), "{err:?}");
        // Dropping the first watch resets its stream; the server notices
        // and frees the slot.
        first.abort();
        let _ = first.await;
        let started = Instant::now();
        loop {
            let mut got = 0;
            let r = tokio::time::timeout(
                SECOND,
                client.watch(&peer, &blob, layout, DEADLINE, |_| got += 1),
            )
            .await;
            match r {
                // Still open (the blob is not complete): it was accepted.
                Err(_) => break,
                Ok(Err(FetchError::Busy(_))) if started.elapsed() < 10 * SECOND => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
}

/// `GetState`: a complete blob is vouched for whole (every chunk hash, from
/// the recorded ones or from reading the verified file, the same either
/// way); a blob not held is `None`.
#[tokio::test]
async fn get_state_vouches_for_every_chunk_of_a_complete_blob_and_nothing_else() {
    use super::source::{NodeSource, Vouched};
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
        let data = blob_data(30);
        let (hashes, digest) = hashes_of(&data);
        store.put_small(&digest, Kind::Blob, &data, None).unwrap();
        let origin = shoal_registry_shim::client::OriginClient::new(Default::default()).unwrap();
        let transfers = crate::transfer::Transfers::new(store.clone(), origin);
        let vouched = Vouched::default();
        let source = NodeSource::vouching(store.clone(), transfers, MIN_CHUNK, vouched.clone());
        let ca = TestCa::new("cluster");
        let (_server, peer) = serve(&ca, Arc::new(source), ServeLimits::default());
        let client = ca.client(Some("client-1"));

        let st = client
            .state(&peer, &digest, DEADLINE)
            .await
            .unwrap()
            .expect("a complete blob has a state");
        assert_eq!((st.size, st.chunk_size), (data.len() as u64, MIN_CHUNK));
        assert!(st.have.is_full() && st.vouched.is_full());
        let want: Vec<[u8; 32]> = hashes.hashes().iter().map(|h| h.unwrap()).collect();
        assert_eq!(st.hashes, want, "hashed from the file");

        let other = Digest::of(&blob_data(31));
        assert!(client
            .state(&peer, &other, DEADLINE)
            .await
            .unwrap()
            .is_none());

        // Hashes recorded at completion are used as they are.
        let (hashes2, digest2) = hashes_of(&blob_data(32));
        store
            .put_small(&digest2, Kind::Blob, &blob_data(32), None)
            .unwrap();
        vouched.fill(
            &digest2,
            hashes2
                .hashes()
                .iter()
                .enumerate()
                .map(|(i, h)| (i as u32, h.unwrap())),
        );
        let st = client
            .state(&peer, &digest2, DEADLINE)
            .await
            .unwrap()
            .unwrap();
        let want: Vec<[u8; 32]> = hashes2.hashes().iter().map(|h| h.unwrap()).collect();
        assert_eq!(st.hashes, want);
    })
    .await;
}

#[test]
fn vouched_hashes_keep_origin_ones_and_stay_bounded() {
    use super::source::Vouched;
    let v = Vouched::default();
    let d = Digest::of(b"x");
    v.record(&d, [(0, [1; 32]), (2, [3; 32])]);
    // Filling never replaces a hash computed from origin bytes.
    v.fill(&d, [(0, [9; 32]), (1, [2; 32])]);
    let mut have = Bitfield::new(3).unwrap();
    for i in 0..3 {
        have.set(i).unwrap();
    }
    let (bits, hashes) = v.among(&d, &have);
    assert_eq!(bits.count(), 3);
    assert_eq!(hashes, vec![[1; 32], [2; 32], [3; 32]]);
    assert_eq!(v.all(&d, 3), Some(vec![[1; 32], [2; 32], [3; 32]]));
    assert_eq!(v.all(&d, 4), None, "a hash missing");
    // Only held chunks are vouched for.
    let mut some = Bitfield::new(3).unwrap();
    some.set(2).unwrap();
    assert_eq!(v.among(&d, &some).1, vec![[3; 32]]);
    // Past the blob bound the oldest blob goes.
    for i in 0..Vouched::MAX_BLOBS as u32 {
        v.record(&Digest::of(&i.to_be_bytes()), [(0, [0; 32])]);
    }
    assert_eq!(v.all(&d, 3), None, "the oldest blob was kept");
}

// ---------------------------------------------------------------------------
// Upload pacing learned from losses
// ---------------------------------------------------------------------------

/// A UDP socket that drops every `every`-th datagram it sends (all
/// connections alike, as a full uplink does), one datagram per send.
#[derive(Debug)]
struct Lossy {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    every: usize,
    sent: AtomicUsize,
}

impl quinn::AsyncUdpSocket for Lossy {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        if self.every > 0 && self.sent.fetch_add(1, Ordering::Relaxed) % self.every == 0 {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The operator's upload cap in [`pacing_under_loss`]: low enough that
/// loopback itself loses nothing.
const OPERATOR_CAP: u64 = 2_000_000;

/// Serves 16 chunks to four clients, each fetching them over and over for
/// two seconds, through a server socket that drops every `every`-th
/// datagram (0: none), under [`OPERATOR_CAP`]; returns the cap in force at
/// the end.
async fn pacing_under_loss(every: usize) -> Option<u64> {
    let data: Vec<u8> = (0..MIN_CHUNK as usize * 16)
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    let (hashes, digest) = hashes_of(&data);
    let ca = TestCa::new("cluster");
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let socket = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let socket = Arc::new(Lossy {
        inner: runtime.wrap_udp_socket(socket).unwrap(),
        every,
        sent: AtomicUsize::new(0),
    });
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(ca.server_config("server-1")),
        socket,
        runtime,
    )
    .unwrap();
    let rate = crate::rate::RateLimit::adjustable(Some(OPERATOR_CAP));
    let limits = ServeLimits {
        upload_rate: rate.clone(),
        pace_uploads: true,
        ..ServeLimits::default()
    };
    let handle = PeerServer::spawn(endpoint, Arc::new(MemSource::with(&data)), limits);
    let peer = PeerAddr {
        addr: handle.local_addr().unwrap(),
        name: "server-1".into(),
    };
    let all: Vec<u32> = (0..16).collect();
    let until = Instant::now() + 2 * SECOND;
    let mut clients = tokio::task::JoinSet::new();
    for k in 0..4 {
        let client = ca.client(Some(&format!("client-{k}")));
        let (peer, digest, hashes, all) = (peer.clone(), digest, hashes.clone(), all.clone());
        clients.spawn(async move {
            let mut verified = 0;
            while Instant::now() < until {
                let got = client.fetch(&peer, &digest, &hashes, &all, DEADLINE).await;
                for (_, r) in got {
                    assert!(matches!(r, ChunkResult::Verified(_)), "{r:?}");
                    verified += 1;
                }
            }
            verified
        });
    }
    while let Some(verified) = clients.join_next().await {
        assert!(
            verified.unwrap() >= 16,
            "every client got the blob at least once"
        );
    }
    let learned = rate.current();
    handle.shutdown().await;
    learned
}

#[tokio::test]
async fn losses_on_every_connection_teach_the_server_to_pace_its_uploads() {
    bounded(async {
        // 5 % of the server's datagrams lost, on all four connections:
        // uploads are paced under what got through, below the operator's cap.
        let cap = pacing_under_loss(20).await.unwrap();
        assert!(
            cap < OPERATOR_CAP * 95 / 100,
            "{cap} B/s learned under 5 % loss"
        );
        // Without losses only the operator's cap holds.
        assert_eq!(pacing_under_loss(0).await, Some(OPERATOR_CAP));
    })
    .await;
}
