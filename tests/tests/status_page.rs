//! The tracker's status page (`GET /` on its ops listener), loaded in a
//! real headless browser (Debian's `chromium`): it lists the members, the
//! blobs they hold and the preheat jobs.

use std::time::Duration;

use shoal_tests::cluster::Cluster;
use shoal_tests::fixture::Origin;
use shoal_tests::util::{require_program, run_command};
use shoal_tests::{fresh_seed, ShoaldOpts, MIB};

/// The DOM chromium renders for `url`, and a screenshot's size in bytes.
async fn browse(url: &str) -> (String, u64) {
    let chromium = require_program("chromium", "chromium").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = |cmd: &mut tokio::process::Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg("--window-size=1280,900");
    };
    let mut dump = tokio::process::Command::new(&chromium);
    base(&mut dump);
    dump.args(["--dump-dom", url]);
    let out = run_command(dump, Duration::from_secs(90)).await.unwrap();
    let shot = dir.path().join("page.png");
    let mut png = tokio::process::Command::new(&chromium);
    base(&mut png);
    png.arg(format!("--screenshot={}", shot.display())).arg(url);
    run_command(png, Duration::from_secs(90)).await.unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    (String::from_utf8_lossy(&out.stdout).into_owned(), size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_lists_members_hot_blobs_and_jobs_in_a_browser() {
    let origin = Origin::start().await.unwrap();
    let (blob, digest) = shoal_tests::random_blob(2 * MIB, fresh_seed());
    origin.registry.push_blob("team/blob", &blob).await.unwrap();
    let cluster = Cluster::start().await.unwrap();
    let a = cluster
        .member("node-a", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    let b = cluster
        .member("node-b", ShoaldOpts::insecure_default(&origin.addr()))
        .await
        .unwrap();
    for n in [&a, &b] {
        n.pull_blob("team/blob", &digest, blob.len() as u64)
            .await
            .unwrap();
    }
    // A job that fails on both members (no such tag), so the page shows it.
    let missing = format!("{}/team/blob:none", origin.addr());
    let out = a
        .ctl(&["preheat", &missing], Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Both members announce their blob (heartbeat every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;

    let (dom, png) = browse(&format!("{}/", cluster.tracker_ops_url())).await;
    assert!(dom.contains("<h1>Shoal tracker</h1>"), "{dom}");
    assert!(dom.contains("<span id=\"members\">2</span>"), "{dom}");
    let table = |id: &str| {
        let start = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no {id}: {dom}"));
        let end = dom[start..].find("</table>").unwrap() + start;
        dom[start..end].to_owned()
    };
    let members = table("member-table");
    assert!(
        members.contains("node-a") && members.contains("node-b"),
        "{members}"
    );
    let blobs = table("blob-table");
    assert!(blobs.contains(&digest), "{blobs}");
    // Two complete holders, no partial ones.
    assert!(
        blobs.contains("<td class=\"n\">2</td><td class=\"n\">0</td>"),
        "{blobs}"
    );
    let jobs = table("job-table");
    assert!(
        jobs.contains("team/blob:none") && jobs.contains("node-a"),
        "{jobs}"
    );
    assert!(jobs.contains("<td class=\"n failed\">2</td>"), "{jobs}");
    assert!(png > 10_000, "the screenshot is {png} bytes");
}
