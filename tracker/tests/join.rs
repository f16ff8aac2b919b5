//! The join listener (`--join-listen`, `--join-token-file`) of the
//! `shoal-tracker` binary: a node without a certificate gets one for its
//! name with a valid token and a certificate request, and nothing else;
//! the mutual-TLS API renews it and does not take joins.

#![cfg(feature = "net")]

mod common;

use common::{bounded, Cluster, TrackerProcess};
use shoal_tracker::client::{ApiError, ErrorCode, TrackerApi};
use shoal_tracker::https_client::{self, HttpsConfig, HttpsTracker};
use shoal_tracker::tracker_api::{Announce, JoinRequest};

const TOKEN: &str = "0123456789abcdef0123456789abcdef-join";

fn request(node: &str, token: &str) -> JoinRequest {
    let (_key, csr) = shoal_cluster::certificate_request(node).unwrap();
    JoinRequest {
        node: node.parse().unwrap(),
        token: token.into(),
        csr,
    }
}

fn refused_with(r: Result<impl std::fmt::Debug, ApiError>, code: ErrorCode, status: u16) {
    match r {
        Err(ApiError::Refused {
            code: c, status: s, ..
        }) => assert_eq!((c, s), (code, status)),
        other => panic!("expected {code} ({status}), got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_and_a_request_get_a_certificate_and_nothing_else() {
    bounded(async {
        let cluster = Cluster::new();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("# the cluster's join tokens\n{TOKEN}\n")).unwrap();
        let deny = dir.path().join("deny");
        std::fs::write(&deny, "node-bad\n").unwrap();
        let t = TrackerProcess::start(
            &cluster,
            &[
                "--join-listen",
                "127.0.0.1:0",
                "--join-token-file",
                tokens.to_str().unwrap(),
                "--node-cert-validity",
                "2h",
                "--deny-file",
                deny.to_str().unwrap(),
            ],
        )
        .await;
        let join_url = t.join_url.clone().expect("a join listener");
        // A node with only the CA certificate.
        let node_dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            cluster.path().join("ca.crt"),
            node_dir.path().join("ca.crt"),
        )
        .unwrap();
        let tls = || shoal_cluster::ca_only_client_tls(node_dir.path()).unwrap();

        let (key, csr) = shoal_cluster::certificate_request("node-j").unwrap();
        let ok = JoinRequest {
            node: "node-j".parse().unwrap(),
            token: TOKEN.into(),
            csr,
        };
        let reply = https_client::join(&join_url, tls(), &ok).await.unwrap();
        assert_eq!(reply.valid_for_s, 7_200);
        shoal_cluster::write_node_identity(node_dir.path(), &reply.certificate, &key).unwrap();
        // The certificate makes it a member of the mutual-TLS API.
        let id = shoal_cluster::Identity::load(node_dir.path(), "node-j").unwrap();
        let member = HttpsTracker::new(
            &[t.url.as_str()],
            id.client_tls().unwrap(),
            HttpsConfig::default(),
        )
        .unwrap();
        let a = Announce::new(
            "node-j".parse().unwrap(),
            "127.0.0.1:4901".parse().unwrap(),
            vec![],
            vec![],
            false,
        )
        .unwrap();
        member.announce(a).await.unwrap();
        // ... and it may renew there, for its own name only.
        let (_, csr) = shoal_cluster::certificate_request("node-j").unwrap();
        let renewed = member.renew(&"node-j".parse().unwrap(), csr).await.unwrap();
        assert!(renewed.certificate.contains("BEGIN CERTIFICATE"));
        let (_, csr) = shoal_cluster::certificate_request("node-k").unwrap();
        refused_with(
            member.renew(&"node-k".parse().unwrap(), csr).await,
            ErrorCode::NodeMismatch,
            403,
        );

        // A wrong token, a denied name, a request that is not one.
        refused_with(
            https_client::join(
                &join_url,
                tls(),
                &request("node-x", "x".repeat(40).as_str()),
            )
            .await,
            ErrorCode::Unauthorized,
            401,
        );
        refused_with(
            https_client::join(&join_url, tls(), &request("node-bad", TOKEN)).await,
            ErrorCode::Denied,
            403,
        );
        let mut garbage = request("node-y", TOKEN);
        garbage.csr =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
        refused_with(
            https_client::join(&join_url, tls(), &garbage).await,
            ErrorCode::BadRequest,
            400,
        );
        // The join listener serves nothing else; the API does not take joins.
        let on_join_listener =
            HttpsTracker::new(&[join_url.as_str()], tls(), HttpsConfig::default()).unwrap();
        let a = Announce::new(
            "node-j".parse().unwrap(),
            "127.0.0.1:4901".parse().unwrap(),
            vec![],
            vec![],
            false,
        )
        .unwrap();
        refused_with(on_join_listener.announce(a).await, ErrorCode::NotFound, 404);
        // Without a client certificate the API refuses at the handshake;
        // with one, it does not take joins either.
        let r = https_client::join(&t.url, tls(), &request("node-z", TOKEN)).await;
        assert!(matches!(r, Err(ApiError::Unreachable(_))), "{r:?}");
        let body = serde_json::to_vec(&request("node-z", TOKEN)).unwrap();
        let member = common::raw_client(&cluster.identity("node-z"));
        let r = common::send(&member, "POST", &format!("{}/v1/join", t.url), body).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.json["error"]["code"], "not_found", "{}", r.json);
    })
    .await;
}
