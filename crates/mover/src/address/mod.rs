//! Which network destinations the data mover may connect to.
//!
//! A source URL is chosen by a namespace user, so without a rule the mover would fetch whatever
//! the cluster can reach (the cloud's metadata service at 169.254.169.254, an internal Service,
//! the node's loopback) and hand the answer back through the cache. The rule: only globally
//! reachable addresses, plus the destinations the operator names in `--allow-internal-address`.
//!
//! The rule is applied to addresses, never to names, because a name can resolve to anything (and
//! to something else a second later: DNS rebinding). [`guard`] applies it where the address is
//! known: every request's IP-literal host, every redirect hop, every name as it is resolved, and
//! the peer address of every connection before a request is written on it. A client that takes
//! none of those hooks (oci-client's) is given [`proxy`]: a forward proxy in the mover that
//! applies the same rule to every connection it makes on the client's behalf.

pub mod guard;
pub mod proxy;
#[cfg(test)]
mod test_server;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// Why an address is not globally reachable: the special-purpose ranges of the IANA IPv4 and
/// IPv6 registries (RFC 6890 and successors) that a source on the internet never has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Internal {
    Unspecified,
    Loopback,
    LinkLocal,
    Private,
    SharedAddressSpace,
    UniqueLocal,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
}

impl fmt::Display for Internal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Internal::Unspecified => "unspecified",
            Internal::Loopback => "loopback",
            Internal::LinkLocal => "link-local",
            Internal::Private => "private (RFC 1918)",
            Internal::SharedAddressSpace => "carrier-grade NAT shared space (100.64.0.0/10)",
            Internal::UniqueLocal => "unique local (fc00::/7)",
            Internal::Multicast => "multicast",
            Internal::Broadcast => "broadcast",
            Internal::Documentation => "reserved for documentation",
            Internal::Benchmarking => "reserved for benchmarking",
            Internal::Reserved => "reserved, not globally routable",
        })
    }
}

/// `None` when `ip` is globally reachable, else what kind of internal address it is.
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by the
/// IPv4 address they reach.
pub fn classify(ip: IpAddr) -> Option<Internal> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Internal> {
    let [a, b, c, _] = ip.octets();
    let class = match (a, b, c) {
        _ if ip.is_unspecified() => Internal::Unspecified,
        _ if ip.is_broadcast() => Internal::Broadcast,
        // 0.0.0.0/8 "this network": connecting to it reaches the local host on Linux.
        (0, _, _) => Internal::Unspecified,
        (127, _, _) => Internal::Loopback,
        (169, 254, _) => Internal::LinkLocal,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Internal::Private,
        (100, 64..=127, _) => Internal::SharedAddressSpace,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Internal::Documentation,
        (198, 18..=19, _) => Internal::Benchmarking,
        (224..=239, _, _) => Internal::Multicast,
        // 192.0.0.0/24 protocol assignments, 192.88.99.0/24 6to4 relays, 240.0.0.0/4 future use.
        (192, 0, 0) | (192, 88, 99) | (240..=255, _, _) => Internal::Reserved,
        _ => return None,
    };
    Some(class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Internal> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let segments = ip.segments();
    let class = match segments[0] {
        _ if ip.is_unspecified() => Internal::Unspecified,
        _ if ip.is_loopback() => Internal::Loopback,
        0xfe80..=0xfebf => Internal::LinkLocal,
        // Site-local (fec0::/10, deprecated) is private addressing by another name.
        0xfec0..=0xfeff => Internal::Private,
        0xfc00..=0xfdff => Internal::UniqueLocal,
        0xff00..=0xffff => Internal::Multicast,
        0x2001 if segments[1] == 0x0db8 => Internal::Documentation,
        0x3fff if segments[1] < 0x1000 => Internal::Documentation,
        // 2001::/23 protocol assignments (Teredo among them): not a place templates live.
        0x2001 if segments[1] < 0x0200 => Internal::Reserved,
        // Only 2000::/3 is allocated for global unicast; everything else is special or unused
        // (64:ff9b:1::/48 local NAT64, 100::/64 discard, ...).
        0x2000..=0x3fff => return None,
        _ => Internal::Reserved,
    };
    Some(class)
}

/// The IPv4 address an IPv6 address reaches: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated), the NAT64 well-known prefix (`64:ff9b::/96`) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        // `::` and `::1` are themselves, not IPv4-compatible forms of 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

/// One internal destination the operator allows: a network (`10.96.0.0/12`, `fd00::/8`, a bare
/// address is one host) on every port, or one address on one port (`10.96.0.10:9000`,
/// `[fd00::10]:9000`). Host names are not accepted: the rule applies to the address connected
/// to, and a name can be made to resolve anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedInternal {
    Network(IpNet),
    Endpoint(SocketAddr),
}

impl AllowedInternal {
    fn allows(&self, ip: IpAddr, port: Option<u16>) -> bool {
        match self {
            AllowedInternal::Network(net) => net.contains(&ip),
            AllowedInternal::Endpoint(endpoint) => {
                endpoint.ip() == ip && port.is_none_or(|p| p == endpoint.port())
            }
        }
    }
}

impl fmt::Display for AllowedInternal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedInternal::Network(net) => write!(f, "{net}"),
            AllowedInternal::Endpoint(endpoint) => write!(f, "{endpoint}"),
        }
    }
}

/// An `--allow-internal-address` entry that is not a network or an address with a port.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "--allow-internal-address {0:?}: expected a network (10.96.0.0/12, fd00::/8), an address \
     (10.96.0.10) or an address and port (10.96.0.10:9000, [fd00::10]:9000); host names are not \
     accepted because the check is on the address connected to"
)]
pub struct InvalidAllowedInternal(pub String);

impl FromStr for AllowedInternal {
    type Err = InvalidAllowedInternal;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = || InvalidAllowedInternal(text.to_owned());
        if let Ok(endpoint) = text.parse::<SocketAddr>() {
            if endpoint.port() == 0 {
                return Err(invalid());
            }
            return Ok(AllowedInternal::Endpoint(canonical_socket(endpoint)));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(AllowedInternal::Network(IpNet::from(ip.to_canonical())));
        }
        let net = text.parse::<IpNet>().map_err(|_| invalid())?;
        // `10.0.0.1/8` is almost certainly a typo for a host or for `10.0.0.0/8`: refuse it
        // rather than guess which.
        if net.addr() != net.network() {
            return Err(invalid());
        }
        Ok(AllowedInternal::Network(net))
    }
}

fn canonical_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A destination the mover refused, and why: the sentence that ends up on the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressRefused {
    #[error(
        "source address {address} is {class}; the operator's --allow-internal-address does not name it"
    )]
    Internal { address: String, class: Internal },
    #[error(
        "source {host} resolves only to addresses the operator does not allow ({addresses}); the operator's --allow-internal-address does not name them"
    )]
    AllResolvedInternal { host: String, addresses: String },
    #[error("redirect to {url} refused: {reason}")]
    Redirect {
        url: String,
        reason: Box<AddressRefused>,
    },
    #[error("it would leave https for plain http")]
    Downgrade,
    #[error("source {url}: only http and https are allowed")]
    Scheme { url: String },
    #[error("source {url}: more than {limit} redirects")]
    TooManyRedirects { url: String, limit: usize },
    #[error(
        "the connection to the source did not report its peer address, so it cannot be checked"
    )]
    UnknownPeer,
}

/// The mover's rule: global addresses, and the internal destinations the operator allows.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    allowed: Vec<AllowedInternal>,
}

impl AddressPolicy {
    pub fn new(allowed: Vec<AllowedInternal>) -> Self {
        Self { allowed }
    }

    /// Whether connecting to `address` (a peer, or a URL's IP-literal host and port) is allowed.
    pub fn check(&self, address: SocketAddr) -> Result<(), AddressRefused> {
        let address = canonical_socket(address);
        self.judge(address.ip(), Some(address.port()))
            .map_err(|class| AddressRefused::Internal {
                address: address.to_string(),
                class,
            })
    }

    /// Whether `ip` may be connected to on some port: the filter applied to a name's addresses
    /// as it is resolved, when the port is not known yet (the peer check then has it).
    pub fn may_connect_to(&self, ip: IpAddr) -> Result<(), Internal> {
        self.judge(ip.to_canonical(), None)
    }

    fn judge(&self, ip: IpAddr, port: Option<u16>) -> Result<(), Internal> {
        match classify(ip) {
            None => Ok(()),
            Some(_) if self.allowed.iter().any(|a| a.allows(ip, port)) => Ok(()),
            Some(class) => Err(class),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<Internal> {
        classify(text.parse().expect("address"))
    }

    #[test]
    fn metadata_loopback_and_private_addresses_are_internal() {
        for (address, expected) in [
            ("169.254.169.254", Internal::LinkLocal),
            ("fe80::1", Internal::LinkLocal),
            ("127.0.0.1", Internal::Loopback),
            ("127.255.0.9", Internal::Loopback),
            ("::1", Internal::Loopback),
            ("10.96.0.1", Internal::Private),
            ("172.16.0.1", Internal::Private),
            ("172.31.255.255", Internal::Private),
            ("192.168.1.1", Internal::Private),
            ("fd00:ec2::254", Internal::UniqueLocal),
            ("fc00::1", Internal::UniqueLocal),
            ("100.64.0.1", Internal::SharedAddressSpace),
            ("100.127.255.255", Internal::SharedAddressSpace),
            ("0.0.0.0", Internal::Unspecified),
            ("0.1.2.3", Internal::Unspecified),
            ("::", Internal::Unspecified),
            ("224.0.0.1", Internal::Multicast),
            ("ff02::1", Internal::Multicast),
            ("255.255.255.255", Internal::Broadcast),
            ("192.0.2.7", Internal::Documentation),
            ("2001:db8::1", Internal::Documentation),
            ("198.18.0.1", Internal::Benchmarking),
            ("240.0.0.1", Internal::Reserved),
            ("100::1", Internal::Reserved),
            ("2001::1", Internal::Reserved),
        ] {
            assert_eq!(class(address), Some(expected), "{address}");
        }
    }

    #[test]
    fn ipv6_forms_of_internal_ipv4_addresses_are_internal() {
        for (address, expected) in [
            ("::ffff:169.254.169.254", Internal::LinkLocal),
            ("::ffff:127.0.0.1", Internal::Loopback),
            ("::ffff:10.0.0.1", Internal::Private),
            ("::127.0.0.1", Internal::Loopback),
            ("64:ff9b::a9fe:a9fe", Internal::LinkLocal),
            ("2002:7f00:1::1", Internal::Loopback),
        ] {
            assert_eq!(class(address), Some(expected), "{address}");
        }
    }

    #[test]
    fn public_addresses_are_global() {
        for address in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.255.255",
            "2606:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(class(address), None, "{address}");
        }
    }

    #[test]
    fn allowlist_entries_are_networks_or_endpoints_never_names() {
        let parse = |t: &str| t.parse::<AllowedInternal>();
        assert_eq!(
            parse("10.96.0.0/12").expect("network"),
            AllowedInternal::Network("10.96.0.0/12".parse().expect("net"))
        );
        assert_eq!(
            parse("127.0.0.2").expect("host"),
            AllowedInternal::Network("127.0.0.2/32".parse().expect("net"))
        );
        assert_eq!(
            parse("[fd00::10]:9000").expect("endpoint"),
            AllowedInternal::Endpoint("[fd00::10]:9000".parse().expect("addr"))
        );
        for bad in [
            "minio.storage.svc:9000",
            "localhost",
            "10.0.0.1/8",
            "10.0.0.1:0",
            "",
            "*",
        ] {
            let error = parse(bad).expect_err(bad).to_string();
            assert!(error.contains("host names are not accepted"), "{error}");
        }
    }

    #[test]
    fn internal_addresses_pass_only_when_the_allowlist_names_them() {
        let socket = |t: &str| t.parse::<SocketAddr>().expect("socket");
        let none = AddressPolicy::default();
        let refused = none
            .check(socket("169.254.169.254:80"))
            .expect_err("metadata");
        assert_eq!(
            refused.to_string(),
            "source address 169.254.169.254:80 is link-local; the operator's \
             --allow-internal-address does not name it"
        );
        none.check(socket("8.8.8.8:443")).expect("global");

        let policy = AddressPolicy::new(vec![
            "127.0.0.2".parse().expect("host"),
            "10.96.0.10:9000".parse().expect("endpoint"),
        ]);
        for (address, allowed, what) in [
            ("127.0.0.2:8080", true, "allowed host"),
            ("[::ffff:127.0.0.2]:8080", true, "mapped form of it"),
            ("10.96.0.10:9000", true, "allowed endpoint"),
            ("127.0.0.1:8080", false, "other loopback"),
            ("10.96.0.10:9001", false, "other port"),
            ("169.254.169.254:80", false, "metadata"),
        ] {
            assert_eq!(policy.check(socket(address)).is_ok(), allowed, "{what}");
        }
        // The resolver, which knows no port yet, lets the endpoint's address through for the
        // peer check to judge with the port.
        policy
            .may_connect_to("10.96.0.10".parse().expect("ip"))
            .expect("endpoint's address");
        policy
            .may_connect_to("10.96.0.11".parse().expect("ip"))
            .expect_err("neighbour");
    }
}
