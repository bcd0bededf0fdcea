//! Socket security with real users: `relayctl` run as a second user (made by
//! `scripts/test`) is refused with PERMISSION_DENIED unless the allow-list
//! names its uid or gid, and the socket's group lets its members in while
//! the file mode keeps everyone else out.
//!
//! These tests start clients as other users, so they run as root (as CI
//! does); they fail, never skip, otherwise.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nix::unistd::User;
use relay_sidecar_client::Error;
use support::Dialect;
use support::sidecar::{TestDaemon, dev_relay, settings};

/// The second user; `scripts/test` creates it.
const TEST_USER: &str = "relay-sidecar-test";
const WAIT: Duration = Duration::from_secs(20);

fn test_user() -> User {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run clients as another user, which needs root: run them as root (CI does)"
    );
    User::from_name(TEST_USER)
        .expect("the user database")
        .unwrap_or_else(|| {
            panic!(
                "there is no user {TEST_USER}: scripts/test creates it; by hand:\n    \
                 useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {TEST_USER}"
            )
        })
}

/// A temp dir any user may enter, so that only the socket decides.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `relayctl --json status` run as `uid`:`gid` (no supplementary groups).
async fn relayctl_status_as(uid: u32, gid: u32, socket: &Path) -> Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .arg("--socket")
        .arg(socket)
        .args(["--json", "status"])
        .uid(uid)
        .gid(gid)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, output)
        .await
        .expect("relayctl ends")
        .expect("relayctl runs")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn the_allow_list_admits_listed_uids_and_gids_and_refuses_the_rest() {
    let user = test_user();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let relay = dev_relay().await;

    // Only root by uid.
    let dir = open_dir();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.socket_mode = Some("0666".into());
    s.allow_uids = vec![0];
    let daemon = TestDaemon::start_with(s).await;
    daemon.registered_client().await;
    let refused = relayctl_status_as(uid, gid, &daemon.socket).await;
    assert!(!refused.status.success(), "{}", text(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("permission denied")
            && stderr.contains(&format!("uid {uid} (gid {gid}) may not use this daemon")),
        "{}",
        text(&refused)
    );
    daemon.stop().await;

    // The test user's group by gid: now root is the one refused.
    let dir = open_dir();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.socket_mode = Some("0666".into());
    s.allow_gids = vec![gid];
    let daemon = TestDaemon::start_with(s).await;
    let admitted = relayctl_status_as(uid, gid, &daemon.socket).await;
    assert!(admitted.status.success(), "{}", text(&admitted));
    let status: serde_json::Value = serde_json::from_slice(&admitted.stdout).unwrap();
    assert_eq!(status["uuid"], daemon.uuid.to_string(), "{status}");
    let err = daemon.client().await.status().await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
    // Every service on the socket is behind the same check.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        support::sidecar::channel(&daemon.socket).await,
    );
    let denied = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    daemon.stop().await;
}

#[tokio::test]
async fn the_socket_group_lets_its_members_in_and_the_mode_keeps_others_out() {
    let user = test_user();
    let relay = dev_relay().await;
    let dir = open_dir();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.socket_group = Some(TEST_USER.into());
    let daemon = TestDaemon::start_with(s).await;
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.gid(), user.gid.as_raw());
    assert_eq!(meta.mode() & 0o777, 0o660);

    // A member of the group, not the owner: in by the group bits.
    let member = relayctl_status_as(user.uid.as_raw(), user.gid.as_raw(), &daemon.socket).await;
    assert!(member.status.success(), "{}", text(&member));
    // Neither owner nor member: the kernel refuses the connection.
    let nobody = User::from_name("nobody").unwrap().expect("user nobody");
    let other = relayctl_status_as(nobody.uid.as_raw(), nobody.gid.as_raw(), &daemon.socket).await;
    assert!(!other.status.success(), "{}", text(&other));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("cannot connect"),
        "{}",
        text(&other)
    );
    // And the message says what would let them in.
    assert!(
        String::from_utf8_lossy(&other.stderr).contains(&format!(
            "permission denied: the socket has mode 0660, owner root, group {TEST_USER}; ask to be added to group {TEST_USER}"
        )),
        "{}",
        text(&other)
    );
    daemon.stop().await;
}
