//! The origin client's auth flow against in-process servers: Bearer tokens
//! (scope cache, expiry), Basic, and the errors when access is refused.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use shoal_proto::{Digest, ErrorCode, Reference, RepoName};
use shoal_registry_shim::client::{Credentials, OriginClient, OriginError};

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// A registry that wants `Bearer tok-*` and is its own token realm, handing
/// out tokens that live `expires_in` seconds.
async fn bearer_registry(expires_in: u64, token_field: &'static str) -> (Server, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let f = fetches.clone();
    let server = serve(move |req| {
        let f = f.clone();
        async move {
            if req.path == "/token" {
                let n = f.fetch_add(1, Ordering::SeqCst) + 1;
                let body = format!(r#"{{"{token_field}":"tok-{n}","expires_in":{expires_in}}}"#);
                return reply(200, &[("content-type", "application/json")], body);
            }
            let ok = req
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer tok-"));
            if ok {
                reply(200, &[("content-length", "3")], "")
            } else {
                let challenge = format!(
                    r#"Bearer realm="http://{}/token",service="test-svc",scope="repository:a/b:pull,push""#,
                    req.host()
                );
                reply(
                    401,
                    &[("www-authenticate", &challenge), ("content-type", "application/json")],
                    oci_error("UNAUTHORIZED", "authentication required"),
                )
            }
        }
    })
    .await;
    (server, fetches)
}

#[tokio::test]
async fn bearer_token_is_cached_per_scope_and_refetched_after_expiry() {
    bounded(30, async {
        let (server, fetches) = bearer_registry(1, "token").await;
        let client = OriginClient::new(test_config()).unwrap();
        let reg = server.registry();
        let d = Digest::of(b"abc");

        assert_eq!(client.head_blob(&reg, &repo("a/b"), &d).await.unwrap(), 3);
        let seen = server.seen();
        assert_eq!(seen.len(), 3, "{seen:#?}");
        assert_eq!(
            seen[0].header("authorization"),
            None,
            "first try is anonymous"
        );
        assert_eq!(seen[1].path, "/token");
        assert_eq!(seen[1].query_all("service"), ["test-svc"]);
        // Our pull scope, plus the extra one the challenge asked for.
        assert_eq!(
            seen[1].query_all("scope"),
            ["repository:a/b:pull", "repository:a/b:pull,push"]
        );
        assert_eq!(
            seen[1].header("authorization"),
            None,
            "no credentials: anonymous token"
        );
        assert_eq!(
            seen[2].header("authorization").as_deref(),
            Some("Bearer tok-1")
        );

        // Cached: one request, with the token.
        client.head_blob(&reg, &repo("a/b"), &d).await.unwrap();
        let seen = server.seen();
        assert_eq!(seen.len(), 4);
        assert_eq!(
            seen[3].header("authorization").as_deref(),
            Some("Bearer tok-1")
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // Another repository is another scope: another token.
        client.head_blob(&reg, &repo("c/d"), &d).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        let token_req = server
            .seen()
            .into_iter()
            .rfind(|s| s.path == "/token")
            .unwrap();
        assert_eq!(token_req.query_all("scope")[0], "repository:c/d:pull");

        // After expires_in, the token is no longer used.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let before = server.seen().len();
        client.head_blob(&reg, &repo("a/b"), &d).await.unwrap();
        let seen = server.seen();
        let new = &seen[before..];
        assert_eq!(new.len(), 3, "{new:#?}");
        assert_eq!(new[0].header("authorization"), None);
        assert_eq!(new[1].path, "/token");
        assert_eq!(
            new[2].header("authorization").as_deref(),
            Some("Bearer tok-3")
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
    })
    .await;
}

#[tokio::test]
async fn token_realm_gets_basic_credentials_and_access_token_is_accepted() {
    bounded(30, async {
        let (server, _) = bearer_registry(300, "access_token").await;
        let reg = server.registry();
        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&reg, "alice", "s3cret");
        let client = OriginClient::new(cfg).unwrap();
        client
            .head_blob(&reg, &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap();
        let seen = server.seen();
        assert_eq!(seen[1].path, "/token");
        assert_eq!(
            seen[1].header("authorization"),
            Some(basic("alice", "s3cret"))
        );
        // The registry itself never sees the password.
        for s in seen.iter().filter(|s| s.path != "/token") {
            assert!(!s
                .header("authorization")
                .unwrap_or_default()
                .starts_with("Basic"));
        }
    })
    .await;
}

#[tokio::test]
async fn second_401_after_fresh_token_is_unauthorized_with_origin_message() {
    bounded(30, async {
        let server = serve(|req| async move {
            if req.path == "/token" {
                return reply(200, &[], r#"{"token":"useless"}"#);
            }
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="svc",error="insufficient_scope""#,
                req.host()
            );
            reply(
                401,
                &[("www-authenticate", &challenge)],
                oci_error("UNAUTHORIZED", "you shall not pass"),
            )
        })
        .await;
        let client = OriginClient::new(test_config()).unwrap();
        let tag = Reference::Tag("v1".parse().unwrap());
        let err = client
            .get_manifest(&server.registry(), &repo("a/b"), &tag)
            .await
            .unwrap_err();
        match &err {
            OriginError::Unauthorized { message, .. } => {
                assert!(message.contains("you shall not pass"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.to_oci().code, ErrorCode::Unauthorized);
        // 401, token, 401: no more.
        assert_eq!(server.seen().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn token_service_rejecting_credentials_is_unauthorized() {
    bounded(30, async {
        let server = serve(|req| async move {
            if req.path == "/token" {
                return reply(401, &[], oci_error("UNAUTHORIZED", "bad password"));
            }
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="svc""#,
                req.host()
            );
            reply(401, &[("www-authenticate", &challenge)], "")
        })
        .await;
        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&server.registry(), "alice", "wrong");
        let client = OriginClient::new(cfg).unwrap();
        let err = client
            .head_blob(&server.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        match err {
            OriginError::Unauthorized { message, .. } => {
                assert!(
                    message.contains("bad password") && message.contains("token service"),
                    "{message}"
                );
                assert!(
                    message.contains("alice") && !message.contains("wrong"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
}

/// A registry that wants Basic `alice:pw`.
async fn basic_registry() -> Server {
    serve(|req| async move {
        if req.header("authorization") == Some(basic("alice", "pw")) {
            reply(200, &[("content-length", "7")], "")
        } else {
            reply(
                401,
                &[("www-authenticate", r#"Basic realm="Registry Realm""#)],
                oci_error("UNAUTHORIZED", "authentication required"),
            )
        }
    })
    .await
}

#[tokio::test]
async fn basic_challenge_uses_credentials_and_remembers_it() {
    bounded(30, async {
        let server = basic_registry().await;
        let reg = server.registry();
        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&reg, "alice", "pw");
        let client = OriginClient::new(cfg).unwrap();
        let d = Digest::of(b"x");
        assert_eq!(client.head_blob(&reg, &repo("a/b"), &d).await.unwrap(), 7);
        assert_eq!(server.seen().len(), 2);
        // Known to want Basic: credentials go with the first try.
        assert_eq!(client.head_blob(&reg, &repo("c/d"), &d).await.unwrap(), 7);
        assert_eq!(server.seen().len(), 3);

        let anon = OriginClient::new(test_config()).unwrap();
        let err = anon.head_blob(&reg, &repo("a/b"), &d).await.unwrap_err();
        assert!(matches!(err, OriginError::Unauthorized { .. }), "{err:?}");
        assert_eq!(err.to_oci().code, ErrorCode::Unauthorized);

        let mut cfg = test_config();
        cfg.credentials = Credentials::none().with_basic(&reg, "alice", "nope");
        let wrong = OriginClient::new(cfg).unwrap();
        let err = wrong.head_blob(&reg, &repo("a/b"), &d).await.unwrap_err();
        assert!(matches!(err, OriginError::Unauthorized { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn credential_helpers_give_an_error_naming_the_helper() {
    bounded(30, async {
        let server = basic_registry().await;
        let reg = server.registry();
        let text = format!(r#"{{"credHelpers": {{"{reg}": "secretservice"}}}}"#);
        let mut cfg = test_config();
        cfg.credentials =
            Credentials::from_json(&text, Path::new("/home/op/.docker/config.json")).unwrap();
        let client = OriginClient::new(cfg).unwrap();
        let err = client
            .head_blob(&reg, &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        let OriginError::Credentials(msg) = &err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("docker-credential-secretservice"), "{msg}");
        assert!(
            msg.contains("does not run credential helpers") && msg.contains("auths"),
            "{msg}"
        );
        assert!(msg.contains("/home/op/.docker/config.json"), "{msg}");
        let oci = err.to_oci();
        assert_eq!(oci.code, ErrorCode::Unauthorized);
        assert!(oci.message.contains("docker-credential-secretservice"));

        // A credsStore with a Bearer registry: public content still works
        // anonymously; private content names the store's helper.
        let (bearer, _) = bearer_registry(300, "token").await;
        let mut cfg = test_config();
        cfg.credentials = Credentials::from_json(
            r#"{"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "desktop"}"#,
            Path::new("/c.json"),
        )
        .unwrap();
        let client = OriginClient::new(cfg).unwrap();
        client
            .head_blob(&bearer.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap();
        let private = serve(|req| async move {
            if req.path == "/token" {
                return reply(200, &[], r#"{"token":"anonymous"}"#);
            }
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="svc""#,
                req.host()
            );
            reply(401, &[("www-authenticate", &challenge)], "")
        })
        .await;
        let err = client
            .head_blob(&private.registry(), &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OriginError::Credentials(m) if m.contains("docker-credential-desktop")),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn identity_tokens_are_refused_with_a_clear_error() {
    bounded(30, async {
        let server = basic_registry().await;
        let reg = server.registry();
        let text = format!(r#"{{"auths": {{"{reg}": {{"identitytoken": "idtok-XYZ"}}}}}}"#);
        let mut cfg = test_config();
        cfg.credentials = Credentials::from_json(&text, Path::new("/c.json")).unwrap();
        let client = OriginClient::new(cfg).unwrap();
        let err = client
            .head_blob(&reg, &repo("a/b"), &Digest::of(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OriginError::Credentials(m) if m.contains("identitytoken") && !m.contains("idtok-XYZ")),
            "{err:?}"
        );
    })
    .await;
}
