//! Inference stays responsive while a job trains: `/predict` p50 within 3×
//! its idle value. Alone in this test binary (the test harness runs a
//! binary's tests in parallel), so no other test trains meanwhile.

use std::time::{Duration, Instant};

use convscope_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn predict_stays_responsive_while_a_job_trains() {
    let dir = models_dir(&["resnet20-cifar10"]);
    let app = TestApp::spawn(dir.path()).await;
    let (png, _) = cifar_test(0..1).remove(0);
    let time_predicts = || async {
        let mut ms = Vec::new();
        for _ in 0..25 {
            let t = Instant::now();
            let r = app
                .post_images("/models/resnet20-cifar10/predict", &[&png])
                .await;
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    };
    let _ = time_predicts().await; // warm-up
    let idle = time_predicts().await;
    let (status, queued) = app
        .submit_job(
            &json!({"model_name": "busy", "architecture": "cnn_a", "dataset": "mnist",
                "progress_every": 1, "test_limit": 500}),
        )
        .await;
    assert_eq!(status, 202);
    let id = queued["job_id"].as_str().unwrap();
    app.wait_for_job(id, Duration::from_secs(60), |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let busy = time_predicts().await;
    eprintln!("predict p50: idle {idle:.1} ms, while training {busy:.1} ms");
    let (_, job) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(job["status"], "running", "the job trained all along");
    assert!(
        busy <= 3.0 * idle.max(1.0),
        "predict p50 {busy:.1} ms while training vs {idle:.1} ms idle"
    );
    let (status, body) = app.cancel_job(id).await;
    assert_eq!(status, 202, "{body}");
    app.wait_for_job(id, Duration::from_secs(30), job_is_final)
        .await;
    app.stop().await;
}
