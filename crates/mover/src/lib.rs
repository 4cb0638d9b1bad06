//! The data mover: what a copy Job runs. It knows nothing of controllers; it copies one template
//! into one path of a staging store and reports to the cache's status.
//!
//! The operator builds a copy Job's arguments from [`CopyArgs`] and the environment variable
//! names in [`env`], so the two programs share one contract; `run` is the attempt itself.
//!
//! The store folder is shared with every Pod of the namespace, so nothing in it is trusted:
//! every path is reached without following a link (see `folder`), and no source may send more
//! than the size it announced, which is the room the store reserved.

pub mod address;
mod args;
pub mod env;
mod error;
mod folder;
mod landing;
mod oci;
mod plan;
mod populate;
mod ranged;
mod report;
mod resume;
mod run;
mod source;
mod stall;
mod transfer;

pub use args::{
    CopyArgs, DEFAULT_PART_SIZE, DEFAULT_STALL_SECONDS, DEFAULT_STREAMS, RemoveArgs, parse_bytes,
    parse_part_size,
};
pub use error::CopyError;
pub use folder::partial_name;
pub use plan::{MIN_PARTS, Tuning};
pub use populate::{
    DISK_IMAGE, EXIT_FINAL, Filled, PopulateArgs, VolumeMode, is_final, run_populate,
};
pub use run::{run_copy, run_remove};
pub use transfer::Transferred;

pub(crate) use error::{io_error, one_line};
pub(crate) use run::Partial;
