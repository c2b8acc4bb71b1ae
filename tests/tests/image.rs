//! The Dockerfile's premise, tested without a container runtime: the
//! runtime image is distroless cc-debian12 (glibc, libgcc_s, CA certificates,
//! user 65532), so `ingest` and `loadgen` must need no other shared library
//! and must run, as that user, in a root holding only those.

use std::path::PathBuf;

use tests::{TestDb, text};

/// A scratch folder of this test's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ingest-image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// The shared libraries of distroless cc-debian12 that a binary may need:
/// glibc's (libc, libm, and the stubs glibc 2.34+ keeps for old links),
/// the loader, libgcc_s; linux-vdso is the kernel's.
const DISTROLESS_CC_LIBRARIES: [&str; 9] = [
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
];

/// The Dockerfile's premise, without a container runtime: `ingest` and
/// `loadgen` need only the libraries distroless cc has, and `ingest` runs
/// in a root holding nothing else (`chroot`, as the image's nonroot user):
/// `--version`, and `migrate --dry-run` against the stack's database.
#[tokio::test(flavor = "multi_thread")]
async fn the_image_premise_holds() {
    assert_eq!(
        effective_uid(),
        0,
        "this test uses chroot, which needs root (dev/test and CI run as root)"
    );
    let root = scratch("image-root");
    for (binary, name) in [
        (tests::ingest_bin(), "ingest"),
        (tests::loadgen_bin(), "loadgen"),
    ] {
        let output = std::process::Command::new("ldd")
            .arg(&binary)
            .output()
            .expect("ldd runs (libc-bin)");
        let listing = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "ldd {}: {listing}",
            binary.display()
        );
        for line in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let soname = line.split_whitespace().next().unwrap();
            let soname = soname.rsplit('/').next().unwrap();
            assert!(
                DISTROLESS_CC_LIBRARIES.contains(&soname),
                "{name} needs {soname}, which distroless cc-debian12 does not have: \
                 the Dockerfile's runtime image would not start it\n{listing}"
            );
            // "libc.so.6 => /lib/.../libc.so.6 (0x..)" or "/lib64/ld-linux... (0x..)".
            let path = line
                .split_once("=> ")
                .map_or(line, |(_, rest)| rest)
                .split_whitespace()
                .next()
                .unwrap();
            if path.starts_with('/') {
                let target = root.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(path, &target).expect("the library copies");
            }
        }
        let target = root.join("usr/local/bin").join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&binary, &target).expect("the binary copies");
    }
    // What distroless has besides: its users (nonroot is 65532).
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();

    let db = TestDb::create("helm_image").await;
    let chrooted = |args: &[&str]| {
        let output = std::process::Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&root)
            .args(args)
            .env_clear()
            // Distroless's PATH; it also finds chroot itself here.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("chroot runs (coreutils)");
        let (stdout, stderr) = text(&output);
        assert!(
            output.status.success(),
            "{args:?} in the chroot: {stdout}{stderr}"
        );
        stdout
    };
    // The tests crate has the workspace's version, the binaries'.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        chrooted(&["/usr/local/bin/ingest", "--version"]).trim(),
        format!("ingest {version}")
    );
    assert_eq!(
        chrooted(&["/usr/local/bin/loadgen", "--version"]).trim(),
        format!("loadgen {version}")
    );
    let plan = chrooted(&["/usr/local/bin/ingest", "migrate", "--dry-run"]);
    assert!(
        plan.contains("would run") && plan.contains("dry run: nothing was changed"),
        "{plan}"
    );
    db.drop().await;
}

/// The effective user id, read from /proc (no libc call: unsafe is forbidden).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid line")
}
