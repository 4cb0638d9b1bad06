//! The environment variables the mover reads, and which key of the cache's Secret fills each.
//! Credentials reach the mover only this way (never in arguments, logs or status); the operator
//! builds a copy Job's `env` from these tables, so the two sides share one list.

/// HTTP(S) sources: basic auth or a bearer token.
pub const HTTP_USERNAME: &str = "TEMPLATECACHE_HTTP_USERNAME";
pub const HTTP_PASSWORD: &str = "TEMPLATECACHE_HTTP_PASSWORD";
pub const HTTP_TOKEN: &str = "TEMPLATECACHE_HTTP_TOKEN";

/// S3 sources: the names every AWS SDK reads.
pub const S3_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const S3_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const S3_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";

/// OCI sources: a whole `kubernetes.io/dockerconfigjson` pull secret; the mover picks the entry
/// of the reference's registry.
pub const OCI_DOCKER_CONFIG: &str = "TEMPLATECACHE_OCI_DOCKER_CONFIG";

/// Tuning a user may set on the mover's container instead of its arguments.
pub const COPY_STREAMS: &str = "TEMPLATECACHE_COPY_STREAMS";
pub const COPY_PART_SIZE: &str = "TEMPLATECACHE_COPY_PART_SIZE";
pub const COPY_STALL_SECONDS: &str = "TEMPLATECACHE_COPY_STALL_SECONDS";

/// `(variable, key of the http.secretRef Secret)`.
pub const HTTP_SECRET_KEYS: [(&str, &str); 3] = [
    (HTTP_USERNAME, "username"),
    (HTTP_PASSWORD, "password"),
    (HTTP_TOKEN, "token"),
];

/// `(variable, key of the s3.secretRef Secret)`.
pub const S3_SECRET_KEYS: [(&str, &str); 3] = [
    (S3_ACCESS_KEY_ID, "accessKeyId"),
    (S3_SECRET_ACCESS_KEY, "secretAccessKey"),
    (S3_SESSION_TOKEN, "sessionToken"),
];

/// `(variable, key of the oci.secretRef Secret)`.
pub const OCI_SECRET_KEYS: [(&str, &str); 1] = [(OCI_DOCKER_CONFIG, ".dockerconfigjson")];
