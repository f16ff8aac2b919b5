//! The OCI distribution protocol over HTTP, both ways.
//!
//! * [`serve`]: the pull side of the registry API that container runtimes
//!   talk to — routing `/v2/...`, upstream selection, HEAD/GET of manifests
//!   and blobs, `Range`, OCI error JSON — written against the small
//!   [`serve::Content`] trait that the daemon implements. The shim knows HTTP
//!   and OCI, not peers or disks.
//! * `client`: the origin client — auth challenges, token cache, redirects,
//!   retries, per-origin concurrency limits.

pub mod client;
pub mod serve;
