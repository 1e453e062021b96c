//! One owner for the model store: a name a job will produce is held from
//! `POST /jobs` until the job ends, so no upload can take it and no finished
//! job can overwrite an upload; a name is given out once however many ask at
//! the same moment; a panic while answering is a 500 with the request id.

use std::time::Duration;

use convscope::Settings;
use convscope_tests::*;
use serde_json::{Value, json};

/// The bundled CNN_A's manifest renamed `name`, and its weights.
fn cnn_a_as(name: &str) -> (Value, Vec<u8>) {
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(repo().join("models/cnn-a-mnist.json")).unwrap())
            .unwrap();
    manifest["name"] = json!(name);
    let weights = std::fs::read(repo().join("models/cnn-a-mnist.safetensors")).unwrap();
    (manifest, weights)
}

/// A short CNN_A job on real MNIST producing `name`.
fn job(name: &str, train_limit: usize) -> Value {
    json!({
        "model_name": name, "architecture": "cnn_a", "dataset": "mnist",
        "epochs": 1, "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001},
        "seed": 13, "train_limit": train_limit, "test_limit": 200,
        "epoch_snapshots": false
    })
}

async fn upload(app: &TestApp, manifest: &Value, weights: &[u8]) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/models"))
        .multipart(model_form(manifest, weights.to_vec()))
        .send()
        .await
        .unwrap();
    problem_or_json(r).await
}

async fn delete(app: &TestApp, name: &str) -> (u16, Value) {
    let r = app
        .client
        .delete(app.url(&format!("/models/{name}")))
        .send()
        .await
        .unwrap();
    problem_or_json(r).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_a_running_job_holds_is_refused_and_then_serves_the_jobs_weights() {
    let dir = models_dir(&[]);
    let app = TestApp::spawn(dir.path()).await;
    let (manifest, weights) = cnn_a_as("x");
    let (status, queued) = app.submit_job(&job("x", 12800)).await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["job_id"].as_str().unwrap().to_string();
    app.wait_for_job(&id, Duration::from_secs(60), |j| j["status"] != "queued")
        .await;

    // While it runs: the upload of `x` and its deletion are conflicts that
    // name the job; nothing is written.
    let (status, body) = upload(&app, &manifest, &weights).await;
    assert_problem(status, &body, 409, &id);
    let (status, body) = delete(&app, "x").await;
    assert_problem(status, &body, 409, &id);
    assert!(!dir.path().join("x.json").exists());

    // Once it succeeds, `x` is the job's model, not the upload's weights:
    // its logits differ from the bundled CNN_A's on the same digit.
    let done = app
        .wait_for_job(&id, Duration::from_secs(300), job_is_final)
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let digit: Vec<Vec<u8>> = mnist_test(0..1).into_iter().map(|(p, _)| p).collect();
    let served = app
        .post_images_json("/models/x/predict?top_k=10", &digit)
        .await;
    let bundled = TestApp::spawn(&repo().join("models")).await;
    let uploaded = bundled
        .post_images_json("/models/cnn-a-mnist/predict?top_k=10", &digit)
        .await;
    let (a, b) = (
        logits_by_class(&served["predictions"][0]),
        logits_by_class(&uploaded["predictions"][0]),
    );
    assert!(
        a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-2),
        "x serves the uploaded weights: {a:?}"
    );
    let on_disk = std::fs::read(dir.path().join("x.safetensors")).unwrap();
    assert_ne!(on_disk, weights, "the job's checkpoint is on disk");

    // A registered `x`: a job for it is a conflict, and so is a second upload.
    let (status, body) = app.submit_job(&job("x", 640)).await;
    assert_problem(status, &body, 409, "already exists");
    let (status, body) = upload(&app, &manifest, &weights).await;
    assert_problem(status, &body, 409, "already exists");
    // Free again once the job is over: it can be deleted.
    assert_eq!(delete(&app, "x").await.0, 204);
    bundled.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn of_six_simultaneous_jobs_for_one_new_name_exactly_one_is_queued() {
    let dir = models_dir(&[]);
    // No workers: the jobs stay queued, so the names stay held.
    let mut settings = Settings::for_tests(dir.path());
    settings.train_workers = 0;
    let app = TestApp::spawn_with(settings.clone()).await;
    let body = job("six", 640);
    let answers = futures_util::future::join_all((0..6).map(|_| app.submit_job(&body))).await;
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:#?}");
    let id = accepted[0]["job_id"].as_str().unwrap().to_string();
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_problem(*status, body, 409, &id);
    }

    // The hold survives a restart: the queued job still owns the name.
    app.stop().await;
    let app = TestApp::spawn_with(settings).await;
    let (manifest, weights) = cnn_a_as("six");
    let (status, body) = upload(&app, &manifest, &weights).await;
    assert_problem(status, &body, 409, &id);
    // Cancelling the queued job frees it at once.
    let (status, _) = app.cancel_job(&id).await;
    assert_eq!(status, 202);
    let (status, body) = upload(&app, &manifest, &weights).await;
    assert_eq!(status, 201, "{body}");
    // A body with other problems lists the taken name among them (422).
    let mut bad = job("six", 640);
    bad["epochs"] = json!(0);
    let (status, body) = app.submit_job(&bad).await;
    assert_eq!(status, 422, "{body}");
    let errors = body["errors"].to_string();
    assert!(
        errors.contains("already exists") && errors.contains("epochs"),
        "{errors}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_while_answering_is_a_500_with_the_request_id_and_the_next_request_is_served() {
    let dir = models_dir(&["cnn-a-mnist"]);
    let app = TestApp::spawn(dir.path()).await;
    // A path no other test asks for: the hook is process-wide.
    let path = "/models/panic-probe";
    convscope::catch_panic::hook::panic_on(Some(path));
    let r = app
        .client
        .get(app.url(path))
        .header("x-request-id", "panic-test-1")
        .send()
        .await
        .unwrap();
    convscope::catch_panic::hook::panic_on(None);
    assert_eq!(
        r.headers()["x-request-id"].to_str().unwrap(),
        "panic-test-1"
    );
    let (status, body) = problem_or_json(r).await;
    assert_problem(status, &body, 500, "panic-test-1");
    assert_eq!(body["request_id"], "panic-test-1");
    // The same connection pool, the same route: answered normally.
    let (status, body) = app.get_json("/models/cnn-a-mnist").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "cnn-a-mnist");
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.contains("status=\"500\"")),
        "the panic is counted as a 500"
    );
    // Under /v2 the same 500 comes in the inference protocol's shape
    // (armed here, in the same test, since the hook is process-wide).
    let path = "/v2/models/panic-probe";
    convscope::catch_panic::hook::panic_on(Some(path));
    let r = app
        .client
        .get(app.url(path))
        .header("x-request-id", "panic-test-2")
        .send()
        .await
        .unwrap();
    convscope::catch_panic::hook::panic_on(None);
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("request id panic-test-2")),
        "{body}"
    );
    app.stop().await;
}
