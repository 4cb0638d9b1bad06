//! The local Job executor's parts that tests share: how it reports a Job's status the way the
//! Job controller would, and the bound identity it gives a Job's process.

pub mod identity;
pub mod job_status;
