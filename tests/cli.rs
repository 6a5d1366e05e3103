//! The README walk-through through the real binary: `meshd token` and `meshd cert` against a
//! running meshd, and a clear refusal when `meshd cert` is pointed at the wrong data dir.
mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_then_cert_writes_a_verified_identity() {
    let t = TestMeshd::start().await;
    let data = t.data_dir();
    let out = t.dir.path().join("web-certs");
    let token = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args([
            "token",
            "--namespace",
            "default",
            "--service-account",
            "web",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token_file = t.dir.path().join("token.jwt");
    std::fs::write(&token_file, &token.stdout).unwrap();
    let cert = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args([
            "cert",
            "--addr",
            &t.m().addrs.grpc.to_string(),
            "--key-type",
            "ecdsa-p256",
            "--token",
        ])
        .arg(&token_file)
        .arg("--root-cert")
        .arg(t.m().root_cert_path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(cert.status.success(), "{}", String::from_utf8_lossy(&cert.stderr));
    assert!(String::from_utf8_lossy(&cert.stdout).contains("spiffe://cluster.local/ns/default/sa/web"));
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).unwrap();
    assert_eq!(
        leaf_facts(&[chain]).uri_sans,
        vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
    );
    assert_eq!(std::fs::read(out.join("root-cert.pem")).unwrap(), t.root_pem());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private key is 0600");
    }
}

#[test]
fn cert_refuses_a_data_dir_without_an_issuer_key() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("not-meshd");
    let r = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args([
            "cert",
            "--namespace",
            "a",
            "--service-account",
            "b",
            "--root-cert",
            "/dev/null",
            "--data-dir",
        ])
        .arg(&wrong)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("no standalone issuer key"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!wrong.exists(), "nothing created in the wrong directory");
}
