//! Media types of the manifests and layers Shoal moves.

/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker v2 manifest list (multi-platform).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Every manifest type Shoal accepts, most specific first: the `Accept`
/// header sent to origins so they never down-convert to schema 1.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The `Accept` header value listing [`MANIFEST_TYPES`].
pub fn manifest_accept() -> String {
    MANIFEST_TYPES.join(", ")
}

/// Content type for blobs served to clients.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Largest manifest Shoal will hold (CNCF distribution caps at 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The `mediaType` a manifest body declares, if any.
pub fn declared_media_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).ok()?.media_type
}
