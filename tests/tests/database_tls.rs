//! TLS to PostgreSQL with verify-full semantics, against a real server with
//! certificates made here by openssl, found through a real Consul-style DNS.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use tests::failover::{ConsulDns, PgServer, Scratch};

const NAME: &str = "master.tls.service.consul";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA named `ca`, and a server certificate for `NAME` signed by it.
fn certificates(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={NAME}"),
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), format!("subjectAltName=DNS:{NAME}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    // PostgreSQL refuses a key others can read.
    for file in ["server.key", "server.pem"] {
        assert!(
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.join(file))
                .status()
                .unwrap()
                .success()
        );
    }
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
}

fn migrate(url: &str, dns: &str, tls: &[&str]) -> (bool, String) {
    let mut args = vec![
        "migrate",
        "--dry-run",
        "--database-url",
        url,
        "--consul-dns",
        dns,
    ];
    args.extend_from_slice(tls);
    let output = tests::run_ingest(&args, &[]);
    let (stdout, stderr) = tests::text(&output);
    (output.status.success(), format!("{stdout}{stderr}"))
}

#[test]
fn verify_full_checks_the_chain_and_the_consul_name() {
    let scratch = Scratch::new("database-tls");
    let certs = scratch.path.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    assert!(
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&certs)
            .status()
            .unwrap()
            .success()
    );
    certificates(&certs);
    let address = Ipv4Addr::new(127, 0, 0, 4);
    let port = tests::free_port();
    let _server = PgServer::init(
        scratch.path.join("pg"),
        address,
        port,
        "local all all trust\nhostssl all all 127.0.0.0/8 trust\n",
        &format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        ),
    );
    let dns = ConsulDns::start(&scratch.path.join("dns"), NAME, address, None);
    let by_name = format!("postgres://postgres@{NAME}:{port}/postgres");
    let ca = certs.join("ca.pem");
    let other_ca = certs.join("other-ca.pem");
    let (ca, other_ca) = (ca.to_str().unwrap(), other_ca.to_str().unwrap());

    let (ok, out) = migrate(
        &by_name,
        &dns.address(),
        &["--database-tls", "verify-full", "--database-ca-file", ca],
    );
    assert!(ok, "the right CA and the right name: {out}");

    let (ok, out) = migrate(
        &by_name,
        &dns.address(),
        &[
            "--database-tls",
            "verify-full",
            "--database-ca-file",
            other_ca,
        ],
    );
    assert!(
        !ok && out.contains("certificate"),
        "an unknown CA is refused with a reason: {out}"
    );
    assert_eq!(out.lines().count(), 1, "one error line: {out}");
    assert!(out.contains("UnknownIssuer"), "{out}");

    // The certificate names the Consul name, not the address.
    let by_address = format!("postgres://postgres@{address}:{port}/postgres");
    let (ok, out) = migrate(
        &by_address,
        &dns.address(),
        &["--database-tls", "verify-full", "--database-ca-file", ca],
    );
    assert!(
        !ok && out.contains("certificate"),
        "a name mismatch is refused: {out}"
    );

    // The server takes TLS only: without it the connection is refused.
    let (ok, out) = migrate(&by_name, &dns.address(), &[]);
    assert!(!ok && out.contains("no pg_hba.conf entry"), "{out}");

    let (ok, out) = migrate(
        &by_name,
        &dns.address(),
        &[
            "--database-tls",
            "verify-full",
            "--database-ca-file",
            "/nonexistent.pem",
        ],
    );
    assert!(
        !ok && out.contains("invalid --database-ca-file \"/nonexistent.pem\""),
        "{out}"
    );
}
