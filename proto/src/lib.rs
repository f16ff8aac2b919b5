//! Shoal's sans-IO core: the types and parsers every part of Shoal shares.
//!
//! Nothing here does I/O or depends on an async runtime, so the daemon, the
//! tests and (later) the simulator all use the very same code. See
//! `docs/ARCHITECTURE.md` for how the crates fit together.

pub mod announcer;
pub mod chunk;
pub mod digest;
pub mod error;
pub mod media;
pub mod preheat;
pub mod range;
pub mod reference;
pub mod sched;
pub mod session;
pub mod slots;
pub mod tracker_api;
pub mod units;
pub mod wire;

pub use chunk::{Bitfield, ChunkError, ChunkHasher, ChunkHashes, ChunkLayout};
pub use digest::{Digest, DigestError, Sha256Verifier};
pub use error::{ErrorCode, OciError};
pub use range::{parse_range, ByteRange, RangeError};
pub use reference::{ImageRef, NameError, Reference, RepoName, Tag, DOCKER_HUB, DOCKER_HUB_API};
pub use wire::WireError;
