//! The logvault record model and every byte format that crosses a trust
//! boundary.
//!
//! - [`record`]: what a log record is ([`Level`], [`WireRecord`]).
//! - [`batch`]: the signed batch an agent ships ([`Batch`], [`BatchHeader`]),
//!   version 2 as documented in `storage/FORMAT.md`.
//! - [`frame`]: the length-delimited frames of the native protocol
//!   ([`Frame`], [`FrameDecoder`]), whose size cap is checked before any
//!   allocation.
//! - [`segment`]: archive segments (zstd, then AES-256-GCM in chunks under
//!   a data key wrapped by a [`keyring`] key-encryption key).
//! - [`checkpoint`]: signed checkpoints over the archived segments, with
//!   [`merkle`] roots (RFC 6962 hashing).
//! - [`archive`]: segments and checkpoints in object storage (OpenDAL), and
//!   [`audit`], which proves them whole.
//!
//! Every decoder here takes its limits up front and refuses input over them
//! with an error naming the limit; none of them panics on any input (see the
//! property tests in each module).
//!
//! ```
//! use logvault_storage::{batch::{BatchBuilder, Batch, Limits}, record::{Level, WireRecord}};
//! let key = ring::signature::Ed25519KeyPair::from_pkcs8(
//!     ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
//!         .unwrap()
//!         .as_ref(),
//! )
//! .unwrap();
//! let mut builder = BatchBuilder::new("web-1", "/var/log/app.log", 1, 0, [0; 32]);
//! builder.push(WireRecord::new(1_700_000_000_000_000_000, Level::Info, "started"));
//! let bytes = builder.sign(&key);
//! let batch = Batch::decode(&bytes, &Limits::default()).unwrap();
//! assert_eq!(batch.records[0].message, "started");
//! batch.verify(ring::signature::KeyPair::public_key(&key).as_ref()).unwrap();
//! ```
#![warn(missing_docs)]

pub mod archive;
pub mod audit;
pub mod batch;
pub mod checkpoint;
pub mod frame;
pub mod io;
pub mod keyring;
pub mod merkle;
pub mod record;
pub mod segment;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod wire;

pub use batch::{
    Batch, BatchBuilder, BatchError, BatchHeader, BatchView, Codec, Deflater, Inflater, Limits, RecordRef,
    Records,
};
pub use frame::{AckStatus, Frame, FrameDecoder, FrameError, RefuseCode};
pub use record::{Level, WireRecord};
