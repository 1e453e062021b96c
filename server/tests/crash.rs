//! Crash safety of training jobs, with the real binary: `kill -9` the
//! server in the middle of a job, start it again on the same directories,
//! and the job resumes from its last completed epoch, finishes, and
//! registers its model; the models directory holds nothing half-written.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn start(models: &Path, log: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_convscope"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .arg("--models")
        .arg(models)
        .arg("--datasets")
        .arg(repo().join("data"))
        // tracing writes to stdout; both streams go to the log.
        .stdout(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, base }
}

async fn job(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client
        .get(format!("{base}/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_killed_with_the_server_resumes_after_restart_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let log = dir.path().join("server.log");
    let client = reqwest::Client::new();

    let mut first = start(&models, &log).await;
    let r = client
        .post(format!("{}/jobs", first.base))
        .json(
            &json!({"model_name": "survivor", "architecture": "cnn_a", "dataset": "mnist",
                      "epochs": 3, "batch_size": 64, "seed": 13, "train_limit": 6400,
                      "test_limit": 1000, "progress_every": 5}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Wait until the first epoch is done and the second is under way, then kill -9.
    let started = Instant::now();
    let before = loop {
        let j = job(&client, &first.base, &id).await;
        let epochs_done = j["history"].as_array().map_or(0, |h| h.len());
        if epochs_done == 1 && j["progress"]["epoch"] == 2 {
            break j;
        }
        assert!(j["status"] == "running" || j["status"] == "queued", "{j}");
        assert!(started.elapsed() < Duration::from_secs(120), "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    first.child.wait().unwrap();

    // Start again on the same directories: the job is queued again and resumes.
    let mut second = start(&models, &log).await;
    let started = Instant::now();
    let done = loop {
        let j = job(&client, &second.base, &id).await;
        if j["status"] != "running" && j["status"] != "queued" {
            break j;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(done["status"], "succeeded", "{done}\n{log_text}");
    assert_eq!(done["attempts"], 2, "{done}");
    let history = done["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{done}");
    // Epoch 1 was not run again: its record is the one from before the kill.
    assert_eq!(history[0], before["history"][0], "epoch 1 was re-run");
    assert!(log_text.contains("queued to resume"), "{log_text}");

    // The model and its three snapshots serve; nothing failed to load.
    let listed: Value = client
        .get(format!("{}/models", second.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<&str> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "survivor",
            "survivor@epoch-1",
            "survivor@epoch-2",
            "survivor@epoch-3"
        ]
    );
    assert_eq!(listed["load_errors"], json!([]));
    // No temporary or orphaned files: every file is half of a model pair,
    // and the job's work directory is gone.
    let mut files: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    for f in &files {
        if f == ".jobs" {
            continue;
        }
        let stem = f.trim_end_matches(".json").trim_end_matches(".safetensors");
        assert!(
            files.contains(&format!("{stem}.json"))
                && files.contains(&format!("{stem}.safetensors")),
            "stray file {f}: {files:?}"
        );
    }
    let work: Vec<_> = std::fs::read_dir(models.join(".jobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(work.is_empty(), "work directories left: {work:?}");
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}
