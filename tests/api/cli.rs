//! The `convo` binary: default start with a first registration token, config errors,
//! and the admin subcommands.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{PASSWORD, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_convo");

fn convo(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("CONVO_LISTENERS__CLIENT", "127.0.0.1:0")
        .env("CONVO_PASSWORD_HASHING__MEMORY_KIB", "256")
        .env("CONVO_PASSWORD_HASHING__ITERATIONS", "1");
    cmd
}

/// Starts `convo` with no arguments and collects what it prints (stdout and
/// stderr) until it has printed its banner, or is listening and quiet for 500 ms.
fn start_and_read_banner(dir: &std::path::Path) -> (std::process::Child, Vec<String>) {
    let mut child = convo(dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut listening = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                listening |= line.contains("Convo is listening");
                let done = line.contains("registration-token create");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(_) if listening || child.try_wait().unwrap().is_some() => break,
            Err(_) => {}
        }
    }
    (child, lines)
}

#[tokio::test]
async fn first_start_prints_a_registration_token() {
    crate::common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = start_and_read_banner(dir.path());
    let banner = lines.join("\n");
    assert!(banner.contains("for server name localhost"), "{banner}");
    let address = banner.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let token = lines.iter().map(|l| l.trim()).find(|l| l.len() == 20 && l.chars().all(|c| c.is_ascii_alphanumeric()));
    let token = token.unwrap_or_else(|| panic!("no token in {banner}")).to_owned();
    assert!(dir.path().join("convo-data/convo.db").exists(), "data lives in ./convo-data");

    // The printed token registers the first account.
    let http = reqwest::Client::new();
    let register = |auth: serde_json::Value| {
        http.post(format!("http://{address}/_matrix/client/v3/register"))
            .json(&json!({"username": "admin", "password": PASSWORD, "auth": auth}))
            .send()
    };
    let first: serde_json::Value = register(json!(null)).await.unwrap().json().await.unwrap();
    let session = first["session"].as_str().unwrap();
    let resp =
        register(json!({"type": "m.login.registration_token", "token": token, "session": session})).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = register(json!({"type": "m.login.dummy", "session": session})).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    child.kill().unwrap();
    child.wait().unwrap();

    // A second start finds a token and prints none.
    let (mut child, lines) = start_and_read_banner(dir.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lines.iter().all(|l| !l.contains("registration-token create")), "{lines:?}");
}

#[test]
fn bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = convo(dir.path()).env("CONVO_DATABASE__POOL_SIZE", "many").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database.pool_size"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    std::fs::write(dir.path().join("c.toml"), "[listeners]\nclinet = \"127.0.0.1:1\"\n").unwrap();
    let out = convo(dir.path()).args(["--config", "c.toml"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("listeners.clinet"));

    let out = convo(dir.path()).env("CONVO_DATABASE__URL", "postgres://u:p@127.0.0.1:1/db").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database.url") && stderr.contains("refused"), "{stderr}");

    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("CONVO_DATABASE__URL"));
}

#[tokio::test]
async fn admin_commands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = convo(dir.path()).args(["admin"]).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        (out.status.success(), stdout, stderr)
    };
    let (ok, out, err) = run(&["create-user", "root", "--password", PASSWORD, "--admin"]);
    assert!(ok, "{err}");
    assert_eq!(out, "created @root:localhost (admin)");
    let (ok, _, err) = run(&["create-user", "root", "--password", PASSWORD]);
    assert!(!ok && err.contains("taken"), "{err}");
    let (ok, _, err) = run(&["create-user", "weak", "--password", "weak"]);
    assert!(!ok && err.contains("password"), "{err}");
    let (ok, out, _) = run(&["create-user", "gen"]);
    assert!(ok && out.contains("password: "), "a random password is printed: {out}");

    let (ok, token, err) = run(&["registration-token", "create", "--uses", "2", "--expires-in-days", "7"]);
    assert!(ok, "{err}");
    assert_eq!(token.len(), 20);
    let (ok, _, _) = run(&["registration-token", "create", "--token", "my.token_1"]);
    assert!(ok);
    let (_, list, _) = run(&["registration-token", "list"]);
    assert!(list.contains(&format!("{token}\t2\t0\t0\t")), "{list}");
    assert!(list.contains("my.token_1\tunlimited\t0\t0\tnever"), "{list}");
    let (ok, _, err) = run(&["registration-token", "create", "--token", "bad token!"]);
    assert!(!ok && err.contains("A-Z"), "{err}");
    let (ok, out, _) = run(&["registration-token", "revoke", "my.token_1"]);
    assert!(ok && out.contains("revoked"));
    let (ok, _, _) = run(&["registration-token", "revoke", "my.token_1"]);
    assert!(!ok);

    // The accounts work on a server using the same database.
    let db = dir.path().join("convo-data/convo.db");
    let server = TestServer::start_with(crate::common::Backend::Sqlite, |c| {
        c.database.url = format!("sqlite://{}", db.display());
    })
    .await;
    let (token, _) = server.login("root", None).await;
    let (_, body) = server.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
    assert_eq!(body["user_id"], "@root:localhost");

    let (ok, out, err) = run(&["reset-password", "root", "--password", "Brand-New-Pass-5"]);
    assert!(ok, "{err}");
    assert!(out.contains("@root:localhost"));
    // The running server caches tokens for a few seconds (another process changed the
    // database): the session ends within that time.
    let deadline = std::time::Instant::now() + convo::storage::TOKEN_CACHE_TTL + std::time::Duration::from_secs(5);
    loop {
        let status = server.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(std::time::Instant::now() < deadline, "the reset password's session still works");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn admin_media_commands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = convo(dir.path()).args(["admin", "media"]).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        (out.status.success(), stdout, stderr)
    };
    // A server on the data the commands use (the default data_dir, in `dir`).
    let data = dir.path().join("convo-data");
    let server = TestServer::start_with(crate::common::Backend::Sqlite, |c| c.data_dir = data.clone()).await;
    let (_, alice, _) = server.register("alice").await;
    let response = server
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=cat.txt", server.base))
        .bearer_auth(&alice)
        .header("content-type", "text/plain")
        .body("meow")
        .send()
        .await
        .unwrap();
    let mxc = response.json::<serde_json::Value>().await.unwrap()["content_uri"].as_str().unwrap().to_owned();
    let (_, id) = mxc.strip_prefix("mxc://").unwrap().split_once('/').unwrap();
    let download = format!("/_matrix/client/v1/media/download/localhost/{id}");

    let (ok, list, err) = run(&["list", "alice"]);
    assert!(ok, "{err}");
    assert!(list.contains(&format!("{mxc}\t4\ttext/plain\tcat.txt\t")), "{list}");

    let (ok, _, err) = run(&["quarantine", &mxc]);
    assert!(ok, "{err}");
    let (status, body) = server.get(&download, Some(&alice)).await;
    assert_eq!((status, body["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")));
    let (ok, _, err) = run(&["quarantine", &mxc, "--release"]);
    assert!(ok, "{err}");
    assert_eq!(
        server.http.get(format!("{}{download}", server.base)).bearer_auth(&alice).send().await.unwrap().status(),
        StatusCode::OK
    );

    let (ok, out, err) = run(&["delete", &mxc]);
    assert!(ok && out.contains("deleted"), "{err}");
    assert_eq!(server.get(&download, Some(&alice)).await.0, StatusCode::NOT_FOUND);
    let (ok, _, err) = run(&["delete", &mxc]);
    assert!(!ok && err.contains("No media"), "{err}");
    let (ok, _, err) = run(&["quarantine", "not-an-mxc"]);
    assert!(!ok && err.contains("mxc"), "{err}");
    server.stop().await;
}
