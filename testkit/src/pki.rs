//! Test certificates, made at test time with rcgen (no private key is ever committed): a
//! CA, server certificates it issues (valid, expired, for another name), written to a
//! temporary directory the `[tls]` section can point at, and client TLS options trusting
//! the CA.
//!
//! Owns: test certificates and their directory. Must not touch: the relay's or the
//! client's TLS code (they are what these certificates test).

use std::path::PathBuf;

use pabal_client::TlsOptions;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::TempDir;

/// A test certificate authority and a directory for the files it issues.
#[derive(Debug)]
pub struct TestPki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    ca_pem: String,
    dir: TempDir,
}

impl TestPki {
    /// A fresh CA and an empty temporary directory.
    pub fn new() -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pabal test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        TestPki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            ca_params,
            ca_key,
            dir: TempDir::new("pki"),
        }
    }

    /// Issues a certificate for `localhost` valid from `not_before` to `not_after` (years)
    /// and writes it and its key as `cert.pem` and `key.pem`; returns their paths.
    pub fn issue_years(&self, not_before: i32, not_after: i32) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.path("cert.pem");
        let key_path = self.dir.path("key.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A certificate valid now (until 2100).
    pub fn issue(&self) -> (PathBuf, PathBuf) {
        self.issue_years(2020, 2100)
    }

    /// Writes the CA's certificate as `ca.pem` (for a client in another process to trust);
    /// returns its path.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// A path in this PKI's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    /// Client TLS options trusting this CA only, for `localhost`.
    pub fn client(&self) -> TlsOptions {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        TlsOptions::new(roots, "localhost").unwrap()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
