//! TLS with rustls (the `ring` provider): the listener's server config, and the client
//! configs for `https://` upstreams. Both are built while the config is validated, so that a
//! missing file, a file with no certificate, or a key that does not match its certificate is
//! refused at load, not at the first connection.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS 1.3 and 1.2, nothing older.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's bytes, read within [`crate::file::MAX_FILE`].
fn pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::file::read(path, crate::file::MAX_FILE)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Which of the listener's two files a problem is with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PemFile {
    Cert,
    Key,
}

/// The listener's config: the certificate chain and key from PEM files (RSA of 2048 to 4096
/// bits, ECDSA on P-256 or P-384, or Ed25519; PKCS#8, PKCS#1 or SEC1), ALPN offering h2
/// then http/1.1 ([`offering`] takes h2 out). An error names the file it is with (a key
/// that does not fit its certificate: the key).
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, Option<Validity>), (PemFile, String)> {
    let chain = certs(cert).map_err(|e| (PemFile::Cert, e))?;
    let validity = validity(&chain[0]);
    let provider = provider();
    let key = usable_key(key, &provider).map_err(|e| (PemFile::Key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| (PemFile::Cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            // The leaf is parsed only here, to compare its key: one that is no certificate
            // is the cert file's fault, whatever the key.
            rustls::Error::InvalidCertificate(e) => (
                PemFile::Cert,
                format!(
                    "the first certificate in {} cannot be parsed: {e}",
                    cert.display()
                ),
            ),
            e => (
                PemFile::Key,
                format!("the key does not fit the certificate: {e}"),
            ),
        })?;
    config.alpn_protocols = alpn(true);
    Ok((Arc::new(config), validity))
}

/// When a certificate may be used (RFC 5280 §4.1.2.5): clients refuse it outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A DER certificate's validity, read from its `tbsCertificate` (version, serial number,
/// signature algorithm and issuer skipped); `None` if the fields are not where X.509 puts
/// them, or a time is before 1970. Read by hand: these few DER elements do not warrant an
/// X.509 crate, and rustls keeps the parsed certificate to itself.
pub fn validity(der: &[u8]) -> Option<Validity> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    let sequence = |b| match element(b) {
        Some((SEQUENCE, contents, rest)) => Some((contents, rest)),
        _ => None,
    };
    let (cert, _) = sequence(der)?;
    let (tbs, _) = sequence(cert)?;
    let mut fields = tbs;
    if fields.first() == Some(&VERSION) {
        fields = element(fields)?.2;
    }
    for _skipped in ["serialNumber", "signature", "issuer"] {
        fields = element(fields)?.2;
    }
    let (validity, _) = sequence(fields)?;
    let (tag, not_before, rest) = element(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = element(rest)?;
    Some(Validity {
        not_before,
        not_after: time(tag, not_after)?,
    })
}

/// The DER element at the start of `b`: its tag, its contents, and what follows it.
fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let (len, rest) = (rest.get(..n)?, &rest[n..]);
            let len = len.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b));
            (len, rest)
        }
        _ => return None,
    };
    Some((tag, rest.get(..len)?, &rest[len..]))
}

/// An X.509 time: UTCTime (`YYMMDDHHMMSSZ`, years 50 to 99 in the 1900s) or
/// GeneralizedTime (`YYYYMMDDHHMMSSZ`), the forms RFC 5280 §4.1.2.5 allows.
fn time(tag: u8, v: &[u8]) -> Option<SystemTime> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let number = |s: &[u8]| {
        s.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let (year, rest) = match (tag, v.len()) {
        (UTC_TIME, 13) => match number(&v[..2])? {
            yy @ 50.. => (1900 + yy, &v[2..]),
            yy => (2000 + yy, &v[2..]),
        },
        (GENERALIZED_TIME, 15) => (number(&v[..4])?, &v[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let field = |i: usize| number(&rest[i..i + 2]);
    crate::date::utc(
        year,
        field(0)?,
        field(2)?,
        (field(4)?, field(6)?, field(8)?),
    )
}

/// What is wrong with the listener's key file on its own (unreadable, no key, a key of a
/// type or size ring cannot sign with), if anything: judged beside a certificate that was
/// refused, so that both files' problems are told in one round.
pub fn key_problem(key: &Path) -> Option<String> {
    usable_key(key, &provider()).err()
}

/// The private key in `path`, one `provider` can sign with.
fn usable_key(path: &Path, provider: &CryptoProvider) -> Result<PrivateKeyDer<'static>, String> {
    let key = pem(path).and_then(|pem| {
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("no usable private key in {}: {e}", path.display()))
    })?;
    // Loaded once here to tell a key ring cannot sign with (ECDSA on P-521, Ed448, RSA
    // under 2048 or over 4096 bits) from one that does not fit: `with_single_cert` reports
    // both as a mismatch. The sizes are named: "it takes RSA" would not tell why one is not.
    if let Err(e) = provider.key_provider.load_private_key(key.clone_key()) {
        return Err(format!(
            "{} holds a key of a type or size ifmatch cannot use (it takes RSA of 2048 to \
             4096 bits, ECDSA on P-256 or P-384, Ed25519): {e}",
            path.display()
        ));
    }
    Ok(key)
}

/// The protocols a listener offers by ALPN, best first. `http/1.0` too: rustls ends a
/// handshake whose client offers nothing in this list, and an HTTP/1.0 client offering only
/// that would get a fatal alert (nginx lists it too).
fn alpn(http2: bool) -> Vec<Vec<u8>> {
    let all: [&[u8]; 3] = [b"h2", b"http/1.1", b"http/1.0"];
    let from = usize::from(!http2);
    all[from..].iter().map(|p| p.to_vec()).collect()
}

/// `config` offering h2 by ALPN or not (`server.http2`), whatever it offered before: the
/// listener's certificates may be those kept from before a reload that changed `http2`.
pub fn offering(config: &Arc<ServerConfig>, http2: bool) -> Arc<ServerConfig> {
    let alpn = alpn(http2);
    if config.alpn_protocols == alpn {
        return config.clone();
    }
    let mut config = ServerConfig::clone(config);
    config.alpn_protocols = alpn;
    Arc::new(config)
}

/// A client config for `https://` upstreams, and a digest of the roots it trusts: a reload
/// keeps the connections of a pool whose roots did not change (`UpstreamClient::reloaded`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// SHA-256 over the roots' DER, each with its length, in the order read.
    pub roots: [u8; 32],
    /// No root was found: the platform has none (a scratch or distroless image). Said by
    /// the caller, and only where an https route needs them (`upstream::platform_tls`).
    pub no_roots: bool,
}

/// A client config for `https://` upstreams trusting `ca_file` alone (a private CA), or the
/// platform's roots when there is none.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientTls, String> {
    use sha2::Digest as _;
    let mut roots = RootCertStore::empty();
    let mut no_roots = false;
    let mut digest = sha2::Sha256::new();
    let mut read = |c: &CertificateDer<'_>| {
        digest.update((c.len() as u64).to_be_bytes());
        digest.update(c);
    };
    match ca_file {
        Some(path) => {
            for c in certs(path)? {
                read(&c);
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            found.certs.iter().for_each(&mut read);
            let (added, _) = roots.add_parsable_certificates(found.certs);
            no_roots = added == 0;
        }
    }
    // No ALPN here: hyper-rustls refuses a config that has one, and offers none itself for
    // HTTP/1.1 alone; a backend then speaks HTTP/1.1 (it picks no protocol).
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(ClientTls {
        config: Arc::new(config),
        roots: digest.finalize().into(),
        no_roots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn leaf(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn reads_a_certificates_validity_in_both_time_forms() {
        // UTCTime before 2050 (both centuries), GeneralizedTime from 2050 on (RFC 5280).
        let cases = [
            ((1999, 12, 31), (2021, 1, 1), 946_598_400, 1_609_459_200),
            ((2020, 1, 1), (2049, 12, 31), 1_577_836_800, 2_524_521_600),
            ((2020, 1, 1), (2051, 6, 1), 1_577_836_800, 2_569_190_400),
            ((2020, 1, 1), (4096, 1, 1), 1_577_836_800, 67_090_118_400),
        ];
        for (from, to, not_before, not_after) in cases {
            assert_eq!(
                validity(&leaf(from, to)),
                Some(Validity {
                    not_before: at(not_before),
                    not_after: at(not_after)
                }),
                "{from:?} to {to:?}"
            );
        }
    }

    #[test]
    fn what_is_not_a_certificate_has_no_validity() {
        let good = leaf((2020, 1, 1), (2021, 1, 1));
        for cut in [0, 1, 2, 10, 100, good.len() / 2] {
            // Cut short, each length byte then points past the end.
            assert_eq!(validity(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(validity(b"not DER at all"), None);
        assert_eq!(time(0x17, b"2101011200Z"), None, "too short");
        assert_eq!(time(0x17, b"210101120000+0100"), None, "not Z");
        assert_eq!(time(0x17, b"211301120000Z"), None, "month 13");
        assert_eq!(time(0x18, b"20210230120000Z"), None, "30 February");
        assert_eq!(time(0x04, b"210101120000Z"), None, "not a time");
    }
}
