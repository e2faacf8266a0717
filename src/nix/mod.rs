//! The Nix binary cache formats, as small types that know how to parse and print themselves.
//!
//! Nothing here does I/O: every type can be tested alone, and the rest of ncps only ever sees
//! values that already passed these parsers. Each parser is strict, because every byte it reads
//! comes from an upstream or a client that ncps does not trust.

pub mod hash;
pub mod keys;
pub mod nar_name;
pub mod narinfo;
pub mod nix32;
pub mod store_path;

pub use hash::Hash;
pub use keys::{PublicKey, SecretKey};
pub use nar_name::NarName;
pub use narinfo::NarInfo;
pub use store_path::StorePathHash;
