//! The origin client against the real CNCF `docker-registry` (distribution
//! 2.8, the Debian package): Bearer token auth with a token issuer run by
//! the test, and HTTP Basic with an htpasswd file.
//!
//! These tests need `/usr/bin/docker-registry` and fail loudly without it.
//!
//! What distribution 2.8's token auth needs (`registry/auth/token`):
//! `auth.token.{realm, service, issuer, rootcertbundle}` all set; a JWT with
//! `iss` = issuer, `aud` = service as a *string* (an array makes the token
//! "malformed" in 2.8), `exp`/`nbf` within 60 s leeway, an `access` claim
//! `[{type, name, actions}]`, and a header naming the signing key either by
//! `x5c` (a chain verified against the root bundle; a self-signed leaf that
//! is itself in the bundle will do) or by `kid` in libtrust key-ID form. ES256
//! signatures are the raw 64-byte `r || s` (JWS), not DER.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use shoal_proto::media::OCI_MANIFEST;
use shoal_proto::{Digest, ErrorCode, Reference, RepoName};
use shoal_registry_shim::client::{Credentials, OriginClient, OriginError};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SERVICE: &str = "shoal-test";
const ISSUER: &str = "shoal-test-issuer";

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `docker-registry`; killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// Starts the registry with `auth_yaml` (the `auth:` section, indented
    /// by two spaces) and waits until it answers.
    async fn start(dir: &Path, auth_yaml: &str) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install the Debian package docker-registry (these tests never skip)"
        );
        // A port picked free can be taken before the registry binds it
        // (other tests pick ports at the same time): try another then.
        for attempt in 1..=3 {
            match Self::try_start(dir, auth_yaml).await {
                Ok(reg) => return reg,
                Err(log) if attempt < 3 && log.contains("address already in use") => continue,
                Err(log) => panic!("docker-registry did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    async fn try_start(dir: &Path, auth_yaml: &str) -> Result<Registry, String> {
        let port = free_port();
        let config = dir.join("config.yml");
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: shoal-test-secret\nauth:\n{auth_yaml}",
            data = data.display()
        );
        std::fs::write(&config, yaml).unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cannot start docker-registry");
        let mut reg = Registry { child, port, log };
        reg.wait_ready().await?;
        Ok(reg)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}:\n{}", self.log_text()));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen within 20 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- docker-registry log ---\n{}", self.log_text());
        }
    }
}

/// Signs registry tokens with an ES256 key whose self-signed certificate is
/// the registry's root bundle.
struct TokenSigner {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
    rng: SystemRandom,
}

impl TokenSigner {
    fn new() -> TokenSigner {
        let kp = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![ISSUER.to_owned()]).unwrap();
        let cert = params.self_signed(&kp).unwrap();
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &kp.serialize_der(), &rng)
                .unwrap();
        TokenSigner {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            rng,
        }
    }

    /// A JWT granting `access` (name, actions) on repositories.
    fn token(&self, subject: &str, access: &[(String, Vec<String>)]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [b64(&self.cert_der)],
        });
        let access: Vec<_> = access
            .iter()
            .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{:x}", rand::random::<u64>()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64url(sig.as_ref()))
    }
}

/// Parses `repository:<name>:<actions>` scopes.
fn parse_scope(scope: &str) -> Option<(String, Vec<String>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        name.to_owned(),
        actions.split(',').map(str::to_owned).collect(),
    ))
}

/// Runs a token issuer: `alice:wonderland` gets what it asks for, anyone
/// else an empty grant (so the registry refuses them), wrong passwords 401.
async fn token_issuer(signer: Arc<TokenSigner>) -> Server {
    serve(move |req| {
        let signer = signer.clone();
        async move {
            if req.path != "/token" {
                return reply(404, &[], "");
            }
            let user = match req.header("authorization") {
                None => None,
                Some(a) => {
                    let decoded = a
                        .strip_prefix("Basic ")
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .and_then(|b| String::from_utf8(b).ok());
                    if decoded.as_deref() != Some("alice:wonderland") {
                        return reply(401, &[], r#"{"details":"wrong user name or password"}"#);
                    }
                    Some("alice")
                }
            };
            let access: Vec<_> = match user {
                Some(_) => req
                    .query_all("scope")
                    .iter()
                    .filter_map(|s| parse_scope(s))
                    .collect(),
                None => Vec::new(),
            };
            let token = signer.token(user.unwrap_or(""), &access);
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
            reply(
                200,
                &[("content-type", "application/json")],
                body.to_string(),
            )
        }
    })
    .await
}

type PushClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn request(
    http: &PushClient,
    method: &str,
    url: &str,
    auth: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> http::Response<Bytes> {
    let mut b = http::Request::builder().method(method).uri(url);
    if !auth.is_empty() {
        b = b.header("authorization", auth);
    }
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    let resp = http
        .request(b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    http::Response::from_parts(parts, body)
}

/// Pushes a blob with the monolithic POST + PUT upload.
async fn push_blob(
    http: &PushClient,
    reg: &Registry,
    repo: &str,
    auth: &str,
    data: &[u8],
) -> Digest {
    let digest = Digest::of(data);
    let start = request(
        http,
        "POST",
        &reg.url(&format!("/v2/{repo}/blobs/uploads/")),
        auth,
        None,
        vec![],
    )
    .await;
    assert_eq!(start.status(), 202, "upload start: {:?}", start.body());
    let loc = start.headers()["location"].to_str().unwrap();
    let loc = url::Url::parse(&reg.url("/")).unwrap().join(loc).unwrap();
    let sep = if loc.query().is_some() { '&' } else { '?' };
    let put_url = format!("{loc}{sep}digest={digest}");
    let done = request(
        http,
        "PUT",
        &put_url,
        auth,
        Some("application/octet-stream"),
        data.to_vec(),
    )
    .await;
    assert_eq!(done.status(), 201, "upload finish: {:?}", done.body());
    digest
}

/// Pushes an OCI image (config + one layer + manifest) under `tag`.
async fn push_image(
    http: &PushClient,
    reg: &Registry,
    repo: &str,
    auth: &str,
    tag: &str,
) -> (Vec<u8>, Digest, Vec<u8>) {
    let layer: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer_digest = push_blob(http, reg, repo, auth, &layer).await;
    let config_digest = push_blob(http, reg, repo, auth, &config).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest.to_string(), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let put = request(
        http,
        "PUT",
        &reg.url(&format!("/v2/{repo}/manifests/{tag}")),
        auth,
        Some(OCI_MANIFEST),
        manifest.clone(),
    )
    .await;
    assert_eq!(put.status(), 201, "manifest put: {:?}", put.body());
    assert_eq!(
        put.headers()["docker-content-digest"].to_str().unwrap(),
        Digest::of(&manifest).to_string()
    );
    (layer, layer_digest, manifest)
}

fn push_client() -> PushClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

#[tokio::test]
async fn bearer_token_auth_against_real_docker_registry() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(TokenSigner::new());
        let bundle = dir.path().join("root.pem");
        std::fs::write(&bundle, &signer.cert_pem).unwrap();
        let issuer = token_issuer(signer.clone()).await;
        let auth = format!(
            "  token:\n    realm: http://127.0.0.1:{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            issuer.port(),
            bundle.display()
        );
        let reg = Registry::start(dir.path(), &auth).await;
        let http = push_client();

        // Without a token the registry challenges us, naming our issuer.
        let anon = request(&http, "GET", &reg.url("/v2/shoal/test/manifests/v1"), "", None, vec![]).await;
        assert_eq!(anon.status(), 401);
        let challenge = anon.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.contains(&format!("http://127.0.0.1:{}/token", issuer.port())), "{challenge}");
        assert!(challenge.contains("repository:shoal/test:pull"), "{challenge}");

        // Push with a push-scoped token minted directly.
        let push_token = signer.token(
            "alice",
            &[("shoal/test".to_owned(), vec!["pull".to_owned(), "push".to_owned()])],
        );
        let bearer = format!("Bearer {push_token}");
        let probe = request(&http, "GET", &reg.url("/v2/"), &bearer, None, vec![]).await;
        assert_eq!(probe.status(), 200, "registry rejected our token: {:?}\n{}", probe.body(), reg.log_text());
        let (layer, layer_digest, manifest) = push_image(&http, &reg, "shoal/test", &bearer, "v1").await;
        let manifest_digest = Digest::of(&manifest);
        let pushed_token_requests = issuer.seen().len();
        assert_eq!(pushed_token_requests, 0, "the push used a minted token");

        // Through the origin client, with credentials from a config.json.
        let config = dir.path().join("docker-config.json");
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            r#"{{"auths": {{"http://{}": {{"auth": "{}"}}}}}}"#,
            reg.name(),
            b64(b"alice:wonderland")
        )
        .unwrap();
        drop(f);
        let mut cfg = test_config();
        cfg.credentials = Credentials::from_docker_config(&config).unwrap();
        let client = OriginClient::new(cfg).unwrap();
        let name = reg.name();
        let r = repo("shoal/test");

        assert_eq!(client.head_blob(&name, &r, &layer_digest).await.unwrap(), layer.len() as u64);

        let mut s = client.get_blob(&name, &r, &layer_digest, 0).await.unwrap();
        assert_eq!(s.total_size(), Some(layer.len() as u64));
        let got = read_all(&mut s).await.unwrap();
        assert_eq!(Digest::of(&got), layer_digest);
        drop(s);

        let mut s = client.get_blob(&name, &r, &layer_digest, 123_456).await.unwrap();
        assert_eq!((s.offset(), s.total_size()), (123_456, Some(layer.len() as u64)));
        assert_eq!(read_all(&mut s).await.unwrap(), &layer[123_456..]);
        drop(s);

        let tag = Reference::Tag("v1".parse().unwrap());
        let m = client.get_manifest(&name, &r, &tag).await.unwrap();
        assert_eq!((m.digest, m.media_type.as_str()), (manifest_digest, OCI_MANIFEST));
        assert_eq!(m.bytes, manifest);
        let info = client.head_manifest(&name, &r, &tag).await.unwrap();
        assert_eq!((info.digest, info.size), (manifest_digest, manifest.len() as u64));
        assert_eq!(info.media_type, OCI_MANIFEST);
        let by_digest = client
            .get_manifest(&name, &r, &Reference::Digest(manifest_digest))
            .await
            .unwrap();
        assert_eq!(by_digest.bytes, manifest);

        let missing = client.get_blob(&name, &r, &Digest::of(b"nope"), 0).await.unwrap_err();
        assert!(matches!(missing, OriginError::NotFound { code: ErrorCode::BlobUnknown, .. }), "{missing:?}");
        let missing = client
            .get_manifest(&name, &r, &Reference::Tag("v2".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(
            matches!(missing, OriginError::NotFound { code: ErrorCode::ManifestUnknown, .. }),
            "{missing:?}"
        );

        // The issuer saw exactly one token request (then the cache), with
        // our service, our pull scope and alice's credentials.
        let tokens = issuer.seen();
        assert_eq!(tokens.len(), 1, "{tokens:#?}");
        assert_eq!(tokens[0].query_all("service"), [SERVICE]);
        assert_eq!(tokens[0].query_all("scope"), ["repository:shoal/test:pull"]);
        assert_eq!(
            tokens[0].header("authorization"),
            Some(format!("Basic {}", b64(b"alice:wonderland")))
        );

        // Anonymous: the issuer grants nothing and the registry refuses.
        let anon = OriginClient::new(test_config()).unwrap();
        let err = anon.head_blob(&name, &r, &layer_digest).await.unwrap_err();
        assert!(matches!(err, OriginError::Unauthorized { .. }), "{err:?}");
        assert_eq!(err.to_oci().code, ErrorCode::Unauthorized);

        // Wrong password: the issuer says 401.
        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&name, "alice", "looking-glass");
        let wrong = OriginClient::new(cfg).unwrap();
        let err = wrong.get_manifest(&name, &r, &tag).await.unwrap_err();
        assert!(
            matches!(&err, OriginError::Unauthorized { message, .. } if message.contains("token service")),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn basic_auth_against_real_docker_registry_with_htpasswd() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pa55word", 5).unwrap();
        std::fs::write(&htpasswd, format!("bob:{hash}\n")).unwrap();
        let auth = format!(
            "  htpasswd:\n    realm: shoal-basic\n    path: {}\n",
            htpasswd.display()
        );
        let reg = Registry::start(dir.path(), &auth).await;
        let http = push_client();
        let basic = format!("Basic {}", b64(b"bob:pa55word"));
        let data = b"a small layer for the htpasswd registry".to_vec();
        let digest = push_blob(&http, &reg, "team/app", &basic, &data).await;
        let name = reg.name();
        let r = repo("team/app");

        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&name, "bob", "pa55word");
        let client = OriginClient::new(cfg).unwrap();
        assert_eq!(
            client.head_blob(&name, &r, &digest).await.unwrap(),
            data.len() as u64
        );
        let mut s = client.get_blob(&name, &r, &digest, 0).await.unwrap();
        assert_eq!(read_all(&mut s).await.unwrap(), data);

        let anon = OriginClient::new(test_config()).unwrap();
        let err = anon.head_blob(&name, &r, &digest).await.unwrap_err();
        assert!(matches!(err, OriginError::Unauthorized { .. }), "{err:?}");

        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&name, "bob", "wrong");
        let wrong = OriginClient::new(cfg).unwrap();
        let err = wrong.head_blob(&name, &r, &digest).await.unwrap_err();
        assert!(matches!(err, OriginError::Unauthorized { .. }), "{err:?}");
    })
    .await;
}
