//! The mover's command line: the contract between the operator, which renders a Job's arguments
//! from these types, and the `copy` and `remove` subcommands, which parse them. One type on both
//! sides, so the two cannot drift (see the round-trip test).

use std::path::PathBuf;

use crate::{address, env};

/// Arguments of `templatecache copy`.
#[derive(clap::Args, Debug, Clone)]
pub struct CopyArgs {
    /// The cache to report to, `<namespace>/<name>`; no reports when unset (benchmarks).
    #[arg(long)]
    pub cache: Option<String>,
    /// The attempt this copy belongs to.
    #[arg(long)]
    pub attempt: u32,
    /// No attempt follows this one: a failure leaves no partial file, of this attempt or of
    /// an earlier one, since no later attempt would resume it.
    #[arg(long)]
    pub final_attempt: bool,
    /// Final path of the copy inside the mounted store.
    #[arg(long)]
    pub dest: PathBuf,
    /// Source URL (http or https).
    #[arg(long, conflicts_with_all = ["s3_bucket", "oci_reference"])]
    pub http_url: Option<String>,
    /// OCI reference, `registry/repository:tag` or `...@sha256:<hex>`.
    #[arg(long, conflicts_with_all = ["s3_bucket"])]
    pub oci_reference: Option<String>,
    /// The ORAS layer title, or the file under `disk/` of a containerDisk, to stage.
    #[arg(long, requires = "oci_reference")]
    pub oci_file: Option<String>,
    /// The manifest digest an earlier attempt resolved the reference's tag to: pulled instead of
    /// the tag, so every attempt stages the same version.
    #[arg(long, requires = "oci_reference")]
    pub oci_digest: Option<String>,
    /// Talk to the registry over plain HTTP (a registry the operator lists as served without TLS).
    #[arg(long, requires = "oci_reference")]
    pub oci_plain_http: bool,
    /// Source bucket (S3-compatible).
    #[arg(long, requires = "s3_key")]
    pub s3_bucket: Option<String>,
    /// Source object key.
    #[arg(long, requires = "s3_bucket")]
    pub s3_key: Option<String>,
    /// S3 endpoint, `http(s)://host[:port]`.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Address the bucket as `bucket.endpoint` instead of `endpoint/bucket`.
    #[arg(long)]
    pub s3_virtual_host: bool,
    /// Expected digest, `sha256:<hex>`.
    #[arg(long)]
    pub checksum: Option<String>,
    /// Ranged GETs of one object in flight at once (HTTP(S) and S3); 1 reads it as one stream.
    #[arg(long, default_value_t = DEFAULT_STREAMS, env = env::COPY_STREAMS,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// Size of each ranged GET, in bytes or with a binary suffix (`16Mi`, `512Ki`, `1Gi`).
    /// Objects under four parts are read as one stream.
    #[arg(long, default_value_t = DEFAULT_PART_SIZE, env = env::COPY_PART_SIZE,
          value_parser = parse_part_size)]
    pub part_size: u64,
    /// Internal destinations the source may be at, comma-separated or repeated: networks
    /// (`10.96.0.0/12`), addresses (`10.96.0.10`) or address:port (`10.96.0.10:9000`). Every
    /// other loopback, link-local, private or otherwise non-global address is refused.
    #[arg(long, value_delimiter = ',')]
    pub allow_internal_address: Vec<address::AllowedInternal>,
    /// Seconds a source may send nothing (no answer, no byte of a body) before the attempt
    /// fails as stalled: a source that stops without closing the connection would otherwise
    /// hold the copy, and the room reserved for it, forever.
    #[arg(long, default_value_t = DEFAULT_STALL_SECONDS, env = env::COPY_STALL_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stall_seconds: u64,
}

/// Stall limit unless told otherwise: a minute without a byte is no slow link but a dead one.
pub const DEFAULT_STALL_SECONDS: u64 = 60;

/// Part size unless told otherwise: AWS's guidance is 8 to 16 MiB ranges.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;

/// Streams of a copy unless told otherwise: AWS's guidance and the tools people use (rclone 4,
/// s5cmd 5, the AWS CLI 10) sit around it.
pub const DEFAULT_STREAMS: u16 = 8;

/// Smallest and largest part: under 64 KiB the requests cost more than they carry; over 1 GiB
/// a broken part costs too much to fetch again.
const PART_SIZES: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

/// A part size ([`parse_bytes`]) between 64 KiB and 1 GiB.
pub fn parse_part_size(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if !PART_SIZES.contains(&bytes) {
        return Err(format!("{text}: a part must be between 64Ki and 1Gi"));
    }
    Ok(bytes)
}

/// `16Mi`, `512Ki`, `1Gi` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => {
            return Err(format!(
                "{text}: expected bytes, or a number with Ki, Mi or Gi"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text}: not a size"))
}

/// Arguments of `templatecache remove`.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveArgs {
    /// Final path of the copy inside the mounted store; its partial files (in `.partial/`) go too.
    #[arg(long)]
    pub dest: PathBuf,
}

impl CopyArgs {
    /// The command line that parses back into these arguments: `copy` and one `--flag=value`
    /// per set field, in the field order above. A copy Job's container runs exactly this.
    pub fn to_command_line(&self) -> Vec<String> {
        let mut line = vec!["copy".to_owned()];
        let mut value = |flag: &str, value: &dyn std::fmt::Display| {
            line.push(format!("--{flag}={value}"));
        };
        if let Some(cache) = &self.cache {
            value("cache", cache);
        }
        value("attempt", &self.attempt);
        value("dest", &self.dest.display());
        let optional = [
            ("http-url", &self.http_url),
            ("oci-reference", &self.oci_reference),
            ("oci-file", &self.oci_file),
            ("oci-digest", &self.oci_digest),
            ("s3-bucket", &self.s3_bucket),
            ("s3-key", &self.s3_key),
            ("s3-endpoint", &self.s3_endpoint),
            ("s3-region", &self.s3_region),
            ("checksum", &self.checksum),
        ];
        for (flag, set) in optional {
            if let Some(set) = set {
                value(flag, set);
            }
        }
        value("streams", &self.streams);
        value("part-size", &self.part_size);
        value("stall-seconds", &self.stall_seconds);
        // One argument per entry: the Job's spec shows exactly which internal destinations it
        // may reach, and an empty list (the default) allows none.
        for allowed in &self.allow_internal_address {
            value("allow-internal-address", allowed);
        }
        let switches = [
            ("final-attempt", self.final_attempt),
            ("oci-plain-http", self.oci_plain_http),
            ("s3-virtual-host", self.s3_virtual_host),
        ];
        line.extend(
            switches
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(flag, _)| format!("--{flag}")),
        );
        line
    }
}

impl RemoveArgs {
    /// The command line that parses back into these arguments.
    pub fn to_command_line(&self) -> Vec<String> {
        vec![
            "remove".to_owned(),
            format!("--dest={}", self.dest.display()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use clap::{Parser, Subcommand};

    use super::*;

    /// The mover's own parser, as the `templatecache` binary mounts it.
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    #[allow(clippy::large_enum_variant)] // one parse per test
    enum Command {
        Copy(CopyArgs),
        Remove(RemoveArgs),
    }

    fn parse(line: Vec<String>) -> Command {
        let argv = std::iter::once("templatecache".to_owned()).chain(line);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("the rendered line does not parse: {e}"))
            .command
    }

    fn every_field_set() -> CopyArgs {
        CopyArgs {
            cache: Some("vms/img".to_owned()),
            attempt: 3,
            final_attempt: true,
            dest: PathBuf::from("/store/img"),
            http_url: None,
            oci_reference: Some("127.0.0.1:5000/vms/a:1".to_owned()),
            oci_file: Some("disk.img".to_owned()),
            oci_digest: Some(format!("sha256:{}", "d".repeat(64))),
            oci_plain_http: true,
            s3_bucket: None,
            s3_key: None,
            s3_endpoint: None,
            s3_region: None,
            s3_virtual_host: false,
            checksum: Some(format!("sha256:{}", "a".repeat(64))),
            streams: 3,
            part_size: 1 << 20,
            allow_internal_address: vec![
                "10.96.0.0/12".parse().expect("network"),
                "127.0.0.1:9000".parse().expect("address and port"),
            ],
            stall_seconds: 7,
        }
    }

    fn s3_with_every_option() -> CopyArgs {
        CopyArgs {
            oci_reference: None,
            oci_file: None,
            oci_digest: None,
            oci_plain_http: false,
            s3_bucket: Some("templates".to_owned()),
            s3_key: Some("ubuntu/24.04.qcow2".to_owned()),
            s3_endpoint: Some("http://minio:9000".to_owned()),
            s3_region: Some("eu-west-1".to_owned()),
            s3_virtual_host: true,
            final_attempt: false,
            ..every_field_set()
        }
    }

    fn plain_http() -> CopyArgs {
        CopyArgs {
            cache: None,
            http_url: Some("https://images.example/a.img".to_owned()),
            checksum: None,
            allow_internal_address: vec![],
            ..s3_with_every_option()
        }
        .without_s3()
    }

    impl CopyArgs {
        fn without_s3(self) -> Self {
            CopyArgs {
                s3_bucket: None,
                s3_key: None,
                s3_endpoint: None,
                s3_region: None,
                s3_virtual_host: false,
                ..self
            }
        }
    }

    #[test]
    fn a_copy_command_line_parses_back_into_the_same_arguments() {
        for args in [every_field_set(), s3_with_every_option(), plain_http()] {
            let Command::Copy(parsed) = parse(args.to_command_line()) else {
                panic!("a copy line parsed as another subcommand");
            };
            assert_eq!(format!("{parsed:?}"), format!("{args:?}"));
        }
    }

    #[test]
    fn a_remove_command_line_parses_back_into_the_same_arguments() {
        let args = RemoveArgs {
            dest: PathBuf::from("/store/img"),
        };
        let Command::Remove(parsed) = parse(args.to_command_line()) else {
            panic!("a remove line parsed as another subcommand");
        };
        assert_eq!(parsed.dest, args.dest);
    }
}
