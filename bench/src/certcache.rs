//! Certificates made once and kept on disk (issue 5 item 1: "generate a
//! device CA and N device certificates once, cached on disk"): the
//! development PKI a spawned gateway runs with (CA, gateway certificate)
//! and, per CA, the device identity certificates the fleets use. P-256 key
//! generation and signing cost ~0.3 ms per device here; a 10,000-device
//! run no longer pays seconds of it before every measurement, and runs
//! against a fresh gateway reuse the same device IDs (each run's gateway
//! has its own empty data dir, so nothing is signed up twice).
//!
//! The cache is `$COAP_GATEWAY_BENCH_CACHE`, else
//! `$XDG_CACHE_HOME/coap-gateway-bench`, else `~/.cache/coap-gateway-bench`.
//! Delete it to start over; a corrupt or foreign file is ignored and
//! rewritten.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use coap_gateway::auth::pki::{self, Ca, LeafSpec};
use ring::digest;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// The files of a development PKI a gateway runs with.
const PKI_FILES: &[&str] = &["ca.pem", "ca-key.pem", "gateway.pem", "gateway-key.pem"];
/// Identifies the identities file format.
const MAGIC: &[u8; 8] = b"CGWBID01";

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COAP_GATEWAY_BENCH_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("coap-gateway-bench")
}

/// Copies the cached development PKI into `dest` (creating it in the cache
/// first when there is none).
pub fn dev_pki_into(dest: &Path) -> Result<(), String> {
    dev_pki_into_at(&cache_dir(), dest)
}

fn dev_pki_into_at(cache: &Path, dest: &Path) -> Result<(), String> {
    let cached = cache.join("pki");
    if !PKI_FILES.iter().all(|f| cached.join(f).is_file()) {
        let parent = cache.to_path_buf();
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        // Made aside, then renamed: a concurrent run sees all of it or
        // none of it.
        let fresh = parent.join(format!("pki.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&fresh);
        pki::init(&fresh, uuid::Uuid::new_v4(), false)
            .map_err(|e| format!("cannot create the development PKI: {e}"))?;
        let _ = std::fs::remove_dir_all(&cached);
        if std::fs::rename(&fresh, &cached).is_err() {
            let _ = std::fs::remove_dir_all(&fresh);
        }
    }
    std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    for f in PKI_FILES {
        std::fs::copy(cached.join(f), dest.join(f))
            .map_err(|e| format!("cannot copy the cached PKI file {f}: {e}"))?;
    }
    Ok(())
}

/// One device identity: its ID and its certificate and key.
pub struct DeviceCert {
    pub id: uuid::Uuid,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

fn identities_file(cache: &Path, ca_pem: &[u8]) -> PathBuf {
    let d = digest::digest(&digest::SHA256, ca_pem);
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    cache.join(format!("devices-{hex}.bin"))
}

/// `n` device certificates issued by the CA in `pki_dir`: the cached ones
/// first, the rest issued now over `threads` threads and added to the
/// cache.
pub fn device_certs(pki_dir: &Path, n: usize, threads: usize) -> Result<Vec<DeviceCert>, String> {
    device_certs_at(&cache_dir(), pki_dir, n, threads)
}

fn device_certs_at(
    cache: &Path,
    pki_dir: &Path,
    n: usize,
    threads: usize,
) -> Result<Vec<DeviceCert>, String> {
    let ca_pem = std::fs::read(pki_dir.join("ca.pem"))
        .map_err(|e| format!("cannot read {}: {e}", pki_dir.join("ca.pem").display()))?;
    let file = identities_file(cache, &ca_pem);
    let mut certs = read(&file, n).unwrap_or_default();
    if certs.len() >= n {
        certs.truncate(n);
        return Ok(certs);
    }
    let missing = n - certs.len();
    let ca = Ca::load(pki_dir).map_err(|e| format!("cannot load the CA: {e}"))?;
    let threads = threads.clamp(1, missing);
    let per_thread = missing.div_ceil(threads);
    let fresh: Vec<Result<Vec<DeviceCert>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ca = &ca;
                s.spawn(move || {
                    let count = per_thread.min(missing.saturating_sub(t * per_thread));
                    (0..count).map(|_| issue(ca)).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("certificate thread panicked".into()))
            })
            .collect()
    });
    for batch in fresh {
        certs.extend(batch?);
    }
    // A cache that cannot be written costs the next run time, not this one.
    if let Err(e) = write(&file, &certs) {
        eprintln!(
            "warning: cannot cache the device certificates in {}: {e}",
            file.display()
        );
    }
    Ok(certs)
}

fn issue(ca: &Ca) -> Result<DeviceCert, String> {
    let id = uuid::Uuid::new_v4();
    let leaf = ca
        .issue(&LeafSpec::device(id))
        .map_err(|e| format!("cannot issue a device certificate: {e}"))?;
    Ok(DeviceCert {
        id,
        cert: leaf.cert_der,
        key: leaf.key_der,
    })
}

/// Up to `n` records; `None` for a missing or foreign file. A truncated
/// tail (a run stopped while writing) ends the list.
fn read(path: &Path, n: usize) -> Option<Vec<DeviceCert>> {
    let mut r = BufReader::new(std::fs::File::open(path).ok()?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).ok()?;
    if &magic != MAGIC {
        return None;
    }
    let mut out = Vec::new();
    let chunk = |r: &mut BufReader<std::fs::File>| -> Option<Vec<u8>> {
        let mut len = [0u8; 2];
        r.read_exact(&mut len).ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        r.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    while out.len() < n {
        let mut id = [0u8; 16];
        if r.read_exact(&mut id).is_err() {
            break;
        }
        let (Some(cert), Some(key)) = (chunk(&mut r), chunk(&mut r)) else {
            break;
        };
        out.push(DeviceCert {
            id: uuid::Uuid::from_bytes(id),
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
        });
    }
    Some(out)
}

fn write(path: &Path, certs: &[DeviceCert]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(MAGIC)?;
        for c in certs {
            w.write_all(c.id.as_bytes())?;
            for part in [c.cert.as_ref(), c.key.secret_pkcs8_der()] {
                let len = u16::try_from(part.len())
                    .map_err(|_| std::io::Error::other("a certificate over 64 KiB"))?;
                w.write_all(&len.to_be_bytes())?;
                w.write_all(part)?;
            }
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_certs_are_issued_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let pki_dir = dir.path().join("gw-pki");
        dev_pki_into_at(&cache, &pki_dir).unwrap();
        let again = dir.path().join("gw-pki-2");
        dev_pki_into_at(&cache, &again).unwrap();
        // The same CA both times: the cached one.
        assert_eq!(
            std::fs::read(pki_dir.join("ca.pem")).unwrap(),
            std::fs::read(again.join("ca.pem")).unwrap()
        );
        let first = device_certs_at(&cache, &pki_dir, 5, 2).unwrap();
        assert_eq!(first.len(), 5);
        let ids: std::collections::HashSet<_> = first.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), 5, "distinct device IDs");
        // Fewer: the first ones from the cache; more: the cached five and
        // new ones.
        let three = device_certs_at(&cache, &pki_dir, 3, 1).unwrap();
        assert_eq!(
            three.iter().map(|c| c.id).collect::<Vec<_>>(),
            first[..3].iter().map(|c| c.id).collect::<Vec<_>>()
        );
        let eight = device_certs_at(&cache, &pki_dir, 8, 2).unwrap();
        assert_eq!(eight.len(), 8);
        assert_eq!(eight[4].cert.as_ref(), first[4].cert.as_ref());
        assert_eq!(
            eight[4].key.secret_pkcs8_der(),
            first[4].key.secret_pkcs8_der()
        );
        // A file of something else is ignored and replaced.
        let file = identities_file(&cache, &std::fs::read(pki_dir.join("ca.pem")).unwrap());
        std::fs::write(&file, b"garbage").unwrap();
        assert_eq!(device_certs_at(&cache, &pki_dir, 2, 1).unwrap().len(), 2);
        assert_eq!(read(&file, 10).unwrap().len(), 2);
    }
}
